"""The optimizers, one module per family; all are torch.optim.Optimizer subclasses."""
from natasha_ext.optim._base import NatashaOptimizer, NonFiniteError

__all__ = ["NatashaOptimizer", "NonFiniteError"]
