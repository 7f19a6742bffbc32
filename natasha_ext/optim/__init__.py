"""The optimizers, one module per family; all are torch.optim.Optimizer subclasses."""
from natasha_ext.optim._base import NatashaOptimizer, NonFiniteError
from natasha_ext.optim.kfac import ANG, IFANG, KFAC
from natasha_ext.optim.natasha import Natasha2, Natasha15
from natasha_ext.optim.trust_region import ARC, TrustRegion

__all__ = ["ARC", "TrustRegion", "ANG", "IFANG", "KFAC", "NatashaOptimizer", "NonFiniteError", "Natasha15", "Natasha2"]
