"""AdaHessian ops: Hutchinson's diagonal product and the fused AdaHessian update.

``hutchinson_diag_`` forms z * (Hz) with z regenerated from the Philox stream (seed, offset), so
the probe never has to be kept once Hz is known. ``adahessian_step`` does the whole update of a
parameter list in one pass per tensor: spatial mean of |D|, both moments, bias corrections,
Hessian power, decoupled weight decay and the parameter update (see reference.adahessian_step).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (acc_dtype, check_same_numels, check_tensor_list, contiguous_inplace,
                                       dtype_is, mixed_dtypes, readable, register_fake, use_kernel)

#: curv_mode values of adahessian_step_
CURV_NONE, CURV_HZ, CURV_DIAG = 0, 1, 2


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of AdaHessian's moments (and of Hutchinson diagonals) for parameters of ``dtype``."""
    return acc_dtype(dtype)


def spatial_group_size(shape: Sequence[int], block_size: Optional[int] = None) -> int:
    """Number of consecutive elements that share one averaged Hessian diagonal value.

    Conv kernels (3-D, 4-D, 5-D and more: [out, in, *kernel]) average over their kernel dims, so
    G = prod(shape[2:]). 0-D/1-D/2-D tensors use the paper's block average of size b (eq. 9)
    when ``block_size`` is set, else no averaging (G = 1)."""
    if len(shape) >= 3:
        g = 1
        for s in shape[2:]:
            g *= int(s)
        return max(g, 1)
    return int(block_size) if block_size else 1


@torch.no_grad()
def hutchinson_diag_(diag: List[torch.Tensor], hz: List[torch.Tensor], seed: int, offset: int, *,
                     alpha: float = 1.0, accumulate: bool = False, fused: Optional[bool] = None) -> None:
    """``diag += alpha * z * hz`` (``=`` when not ``accumulate``), z the Rademacher draw of the
    Philox stream (seed, offset) over the list (the draw ``rademacher_(hz-shaped, seed, offset)``
    made). Unbiased estimate of diag(H) (paper eq. 8); average n probes with alpha=1/n."""
    check_tensor_list("hz", hz)
    check_tensor_list("diag", diag, hz[0].device if hz else None)
    check_same_numels("hz", hz, "diag", diag)
    if not hz:
        return
    refusals = [mixed_dtypes("hz", hz), mixed_dtypes("diag", diag)]
    if not use_kernel("hutchinson_diag_", fused, list(hz) + list(diag), refusals):
        reference.hutchinson_diag_(list(diag), list(hz), seed, offset, float(alpha), bool(accumulate))
        return
    work, writeback = contiguous_inplace(diag)
    torch.ops.natasha.hutchinson_diag_(work, readable(hz), seed=int(seed), offset=int(offset), alpha=float(alpha),
                                       accumulate=bool(accumulate))
    writeback()


@torch.no_grad()
def hutchinson_diag(hz: List[torch.Tensor], seed: int, offset: int, *, fused: Optional[bool] = None
                    ) -> List[torch.Tensor]:
    """z * hz as new fp32 (fp64 for fp64) tensors; see :func:`hutchinson_diag_`."""
    out = [torch.empty(h.shape, dtype=state_dtype(h.dtype), device=h.device) for h in hz]
    hutchinson_diag_(out, hz, seed, offset, fused=fused)
    return out


@torch.no_grad()
def adahessian_step_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avg: List[torch.Tensor],
                    exp_hess_sq: List[torch.Tensor], curv: List[torch.Tensor], group_sizes: List[int], *,
                    curv_mode: int, abs_first: bool = True, seed: int = 0, offset: int = 0, lr: float,
                    beta1: float, beta2: float, eps: float, weight_decay: float = 0.0,
                    hessian_power: float = 1.0, bias_correction1: float, bias_correction2: float,
                    fused: Optional[bool] = None) -> None:
    """One AdaHessian update in place (math in :func:`natasha_ext.ops.reference.adahessian_step`).

    curv_mode: 0 = reuse the current second moment (``update_each`` steps without a probe),
    1 = ``curv`` is Hz for the probe drawn at (seed, offset), 2 = ``curv`` is a diagonal estimate.
    exp_avg/exp_hess_sq: fp32 state (fp64 for fp64 params)."""
    for name, ts in (("params", params), ("grads", grads), ("exp_avg", exp_avg), ("exp_hess_sq", exp_hess_sq)):
        check_tensor_list(name, ts)
    check_same_numels("params", params, "grads", grads)
    check_same_numels("params", params, "exp_avg", exp_avg)
    check_same_numels("params", params, "exp_hess_sq", exp_hess_sq)
    if curv_mode not in (CURV_NONE, CURV_HZ, CURV_DIAG):
        raise ValueError(f"curv_mode must be 0, 1 or 2, got {curv_mode!r}")
    if curv_mode:
        check_tensor_list("curv", curv)
        check_same_numels("params", params, "curv", curv)
    else:
        curv = []
    if len(group_sizes) != len(params) or any(int(g) < 1 for g in group_sizes):
        raise ValueError("group_sizes must hold one positive int per parameter")
    if not params:
        return
    kw = dict(curv_mode=int(curv_mode), abs_first=bool(abs_first), seed=int(seed), offset=int(offset), lr=float(lr),
              beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
              hessian_power=float(hessian_power), bias_correction1=float(bias_correction1),
              bias_correction2=float(bias_correction2))
    sdt = state_dtype(params[0].dtype)
    refusals = [mixed_dtypes("params", params), dtype_is("grads", grads, params[0].dtype),
                dtype_is("exp_avg", exp_avg, sdt), dtype_is("exp_hess_sq", exp_hess_sq, sdt),
                dtype_is("curv", curv, params[0].dtype if curv_mode == CURV_HZ else sdt)]
    if not use_kernel("adahessian_step_", fused, params, refusals):
        reference.adahessian_step(list(params), list(grads), list(exp_avg), list(exp_hess_sq), list(curv),
                                  [int(g) for g in group_sizes], **kw)
        return
    p_work, p_back = contiguous_inplace(params)
    m_work, m_back = contiguous_inplace(exp_avg)
    v_work, v_back = contiguous_inplace(exp_hess_sq)
    torch.ops.natasha.adahessian_step_(p_work, readable(grads), m_work, v_work, readable(curv),
                                       [int(g) for g in group_sizes], **kw)
    p_back(), m_back(), v_back()


#: the name before the ATen-style `_` suffix (optimizers and user code call it)
adahessian_step = adahessian_step_


@register_fake("hutchinson_diag_")
def _hutchinson_fake(diag, hz, *, seed, offset, alpha, accumulate):
    return None


@register_fake("adahessian_step_")
def _adahessian_step_fake(params, grads, exp_avg, exp_hess_sq, curv, group_sizes, *, curv_mode, abs_first, seed,
                          offset, lr, beta1, beta2, eps, weight_decay, hessian_power, bias_correction1,
                          bias_correction2):
    return None
