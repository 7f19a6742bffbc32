"""Python face of the natasha kernels.

Every function here has the signature of its ``torch.ops.natasha.*`` op plus a keyword-only
``fused=None|True|False``; it validates arguments, then follows the one dispatch rule of
:func:`natasha_ext.ops._dispatch.use_kernel` (the compiled kernel, or the pure-PyTorch reference
in :mod:`natasha_ext.ops.reference`, the specification). Optimizers call only these functions.
Ops that mutate their inputs end in ``_`` as in ATen; ``svrg_step``, ``oja_step`` and
``adahessian_step`` are the same functions under their earlier names.
"""
from natasha_ext.ops._dispatch import fused_available
from natasha_ext.ops.adahessian import adahessian_step, adahessian_step_, hutchinson_diag, hutchinson_diag_
from natasha_ext.ops.foundation import global_norm, rademacher_
from natasha_ext.ops.kfac import ang_combine_, kfac_factor_ema_, kfac_precondition, kfac_smw_apply
from natasha_ext.ops.natasha import oja_step, oja_step_, svrg_step, svrg_step_
from natasha_ext.ops.philox import PhiloxStream
from natasha_ext.ops.trust_region import cg_dots, cg_step_, tr_cg_init_

__all__ = ["adahessian_step_", "adahessian_step", "hutchinson_diag", "hutchinson_diag_", "ang_combine_",
           "kfac_factor_ema_", "kfac_precondition", "kfac_smw_apply", "cg_dots", "cg_step_", "tr_cg_init_",
           "fused_available", "global_norm", "rademacher_", "PhiloxStream", "oja_step_", "oja_step", "svrg_step_",
           "svrg_step"]
