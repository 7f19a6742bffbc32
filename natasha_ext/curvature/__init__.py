"""Curvature building blocks shared by the optimizers: gradients and Hessian-vector products
from a loss closure (and, as the optimizer families land, Hutchinson, Oja, K-FAC factors and
Steihaug CG)."""
from natasha_ext.curvature.hvp import HVP, HVP_METHODS, evaluate_closure, finite_difference_hvp, gradients

__all__ = ["HVP", "HVP_METHODS", "evaluate_closure", "finite_difference_hvp", "gradients"]
