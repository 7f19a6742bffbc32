"""The optimizers, one module per family; all are torch.optim.Optimizer subclasses."""
from natasha_ext.optim._base import NatashaOptimizer, NonFiniteError
from natasha_ext.optim.kfac import ANG, IFANG, KFAC
from natasha_ext.optim.kfac_preconditioner import KFACPreconditioner
from natasha_ext.optim.ekfac import EKFAC
from natasha_ext.optim.trust_region import ARC, TrustRegion
from natasha_ext.optim.adahessian import AdaHessian, HybridSGDAdaHessian
from natasha_ext.optim.natasha import Natasha2, Natasha15

__all__ = ["ARC", "TrustRegion", "ANG", "IFANG", "KFAC", "EKFAC", "KFACPreconditioner", "AdaHessian", "HybridSGDAdaHessian", "Natasha15", "Natasha2", "NatashaOptimizer", "NonFiniteError"]
