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
from natasha_ext.ops._dispatch import (check_same_numels, check_tensor_list, contiguous, contiguous_inplace,
                                       register_fake, use_fused)

#: curv_mode values of adahessian_step
CURV_NONE, CURV_HZ, CURV_DIAG = 0, 1, 2


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of AdaHessian's moments (and of Hutchinson diagonals) for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _has_op(name: str) -> bool:
    """True when the loaded library defines ``natasha::name`` (an older build may not)."""
    try:
        return torch._C._dispatch_has_kernel(f"natasha::{name}") or hasattr(torch.ops.natasha, name)
    except Exception:
        return False


_HAS_HUTCHINSON = _has_op("hutchinson_diag_")
_HAS_STEP = _has_op("adahessian_step")


def _register_fake(name: str):
    return register_fake(name) if _HAS_HUTCHINSON and _HAS_STEP else (lambda fn: fn)


def _one_dtype(ts) -> bool:
    return len({t.dtype for t in ts}) <= 1


def hutchinson_diag_(diag: List[torch.Tensor], hz: List[torch.Tensor], seed: int, offset: int, *,
                     alpha: float = 1.0, accumulate: bool = False, fused: Optional[bool] = None) -> None:
    """``diag += alpha * z * hz`` (``=`` when not ``accumulate``), z the Rademacher draw of the
    Philox stream (seed, offset) over the list (the draw ``rademacher_(hz-shaped, seed, offset)``
    made). Unbiased estimate of diag(H) (paper eq. 8); average n probes with alpha=1/n."""
    check_tensor_list("diag", diag)
    check_tensor_list("hz", hz)
    check_same_numels("hz", hz, "diag", diag)
    if not hz:
        return
    if not _HAS_HUTCHINSON or not use_fused(hz, fused) or not _one_dtype(hz) or not _one_dtype(diag) or diag[0].device != hz[0].device:
        reference.hutchinson_diag_(list(diag), list(hz), seed, offset, float(alpha), bool(accumulate))
        return
    work, writeback = contiguous_inplace(diag)
    torch.ops.natasha.hutchinson_diag_(work, contiguous(hz), seed, offset, float(alpha), bool(accumulate))
    writeback()


def hutchinson_diag(hz: List[torch.Tensor], seed: int, offset: int, *, fused: Optional[bool] = None
                    ) -> List[torch.Tensor]:
    """z * hz as new fp32 (fp64 for fp64) tensors; see :func:`hutchinson_diag_`."""
    out = [torch.empty(h.shape, dtype=state_dtype(h.dtype), device=h.device) for h in hz]
    hutchinson_diag_(out, hz, seed, offset, fused=fused)
    return out


def adahessian_step(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avg: List[torch.Tensor],
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
    args = (int(curv_mode), bool(abs_first), int(seed), int(offset), float(lr), float(beta1), float(beta2),
            float(eps), float(weight_decay), float(hessian_power), float(bias_correction1),
            float(bias_correction2))
    sdt = state_dtype(params[0].dtype)
    ok = (_HAS_STEP and use_fused(params, fused) and _one_dtype(params) and _one_dtype(grads) and grads[0].dtype == params[0].dtype
          and all(t.dtype == sdt for t in list(exp_avg) + list(exp_hess_sq))
          and (not curv or all(c.dtype == (params[0].dtype if curv_mode == CURV_HZ else sdt) for c in curv)))
    if not ok:
        if fused is True and not _one_dtype(params):
            raise RuntimeError("adahessian_step: fused=True needs one parameter dtype per call")
        reference.adahessian_step(list(params), list(grads), list(exp_avg), list(exp_hess_sq), list(curv),
                                  [int(g) for g in group_sizes], *args)
        return
    p_work, p_back = contiguous_inplace(params)
    m_work, m_back = contiguous_inplace(exp_avg)
    v_work, v_back = contiguous_inplace(exp_hess_sq)
    torch.ops.natasha.adahessian_step(p_work, contiguous(grads), m_work, v_work, contiguous(curv),
                                      [int(g) for g in group_sizes], *args)
    p_back(), m_back(), v_back()


@_register_fake("hutchinson_diag_")
def _hutchinson_fake(diag, hz, seed, offset, alpha, accumulate):
    return None


@_register_fake("adahessian_step")
def _adahessian_step_fake(params, grads, exp_avg, exp_hess_sq, curv, group_sizes, curv_mode, abs_first, seed,
                          offset, lr, beta1, beta2, eps, weight_decay, hessian_power, bias_correction1,
                          bias_correction2):
    return None
