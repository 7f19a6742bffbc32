"""Curvature building blocks shared by the optimizers: gradients and Hessian-vector products
from a loss closure (and, as the optimizer families land, Hutchinson, Oja, K-FAC factors and
Steihaug CG)."""
from natasha_ext.curvature.gauss_newton import GaussNewton
from natasha_ext.curvature.steihaug import CGResult, cubic_cg, steihaug_cg
from natasha_ext.curvature.hvp import HVP, HVP_METHODS, evaluate_closure, finite_difference_hvp, gradients
from natasha_ext.curvature.kfac_factors import FactorCollector, KFACLayer, layer_support
from natasha_ext.curvature.oja import OjaResult, oja_min_eigenvector

__all__ = ["CGResult", "cubic_cg", "steihaug_cg", "GaussNewton", "FactorCollector", "KFACLayer", "layer_support", "HVP", "HVP_METHODS", "evaluate_closure", "finite_difference_hvp", "gradients", "OjaResult", "oja_min_eigenvector"]
