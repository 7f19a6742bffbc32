"""Python face of the natasha kernels.

Every function here has the signature of its ``torch.ops.natasha.*`` op plus a keyword-only
``fused=None|True|False``; it validates arguments, then runs the compiled kernel when it is
loaded and supports the tensors' device, else the pure-PyTorch reference in
:mod:`natasha_ext.ops.reference` (the specification). Optimizers call only these functions.
"""
from natasha_ext.ops._dispatch import fused_available
from natasha_ext.ops.adahessian import adahessian_step, hutchinson_diag, hutchinson_diag_
from natasha_ext.ops.foundation import global_norm, rademacher_
from natasha_ext.ops.kfac import ang_combine_, kfac_factor_ema_, kfac_precondition, kfac_smw_apply
from natasha_ext.ops.natasha import oja_step, svrg_step
from natasha_ext.ops.philox import PhiloxStream
from natasha_ext.ops.trust_region import cg_dots, cg_step_, tr_cg_init_

__all__ = ["adahessian_step", "hutchinson_diag", "hutchinson_diag_", "ang_combine_", "kfac_factor_ema_", "kfac_precondition", "kfac_smw_apply", "cg_dots", "cg_step_", "tr_cg_init_", "fused_available", "global_norm", "rademacher_", "PhiloxStream", "oja_step", "svrg_step"]
