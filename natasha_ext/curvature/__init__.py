"""Curvature building blocks shared by the optimizers: gradients and Hessian-vector products
from a loss closure, Hutchinson, Oja, K-FAC statistics and Kronecker strategies, Steihaug CG and
Lanczos."""
from natasha_ext.curvature.steihaug import CGResult, cubic_cg, steihaug_cg
from natasha_ext.curvature.gauss_newton import GaussNewton
from natasha_ext.curvature.hvp import (HVP, HVP_METHODS, ONE_PROBE_HVP_METHODS, double_backward, evaluate_closure,
                                       finite_difference_hvp, gradient_and_hvp, gradients)
from natasha_ext.curvature.kfac_factors import FactorCollector, KFACLayer, layer_support
from natasha_ext.curvature.kronecker import DenseKronecker, LowRankKronecker, damped_inverses
from natasha_ext.curvature.oja import OjaResult, oja_min_eigenvector
from natasha_ext.curvature.hutchinson import hutchinson_diagonal, rademacher_probe, spatial_average

__all__ = ["DenseKronecker", "LowRankKronecker", "damped_inverses", "FactorCollector", "KFACLayer", "layer_support", "CGResult", "cubic_cg", "steihaug_cg", "GaussNewton", "hutchinson_diagonal", "rademacher_probe", "spatial_average", "HVP", "HVP_METHODS", "ONE_PROBE_HVP_METHODS", "double_backward", "evaluate_closure", "finite_difference_hvp", "gradient_and_hvp", "gradients", "OjaResult", "oja_min_eigenvector"]
