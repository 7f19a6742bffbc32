"""natasha_ext: second-order and variance-reduced PyTorch optimizers on fused C++/CUDA kernels.

Optimizers live in :mod:`natasha_ext.optim`, curvature building blocks (Hessian-vector
products, Hutchinson, Oja, K-FAC factors, Steihaug CG) in :mod:`natasha_ext.curvature`, and the
kernels' Python face (fused and reference paths) in :mod:`natasha_ext.ops`.
"""
from natasha_ext import ops  # noqa: F401  (loads the kernels once)

__version__ = "0.1.0"
