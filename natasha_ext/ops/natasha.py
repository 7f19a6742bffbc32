"""Natasha ops: ``svrg_step`` (Natasha1.5's inner step) and ``oja_step`` (Oja's algorithm with
lazy normalisation). Specifications: :func:`natasha_ext.ops.reference.svrg_step` and
:func:`natasha_ext.ops.reference.oja_step`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (check_same_numels, check_tensor_list, contiguous, contiguous_inplace,
                                       register_fake, use_fused)


def _has_kernel(op: str, device: torch.device) -> bool:
    """True when the loaded library has ``natasha::op`` for ``device`` (an older build may not)."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"natasha::{op}", key)
    except Exception:
        return False


def _fake(opname: str):
    """register_fake, skipped when the loaded library predates this op."""
    def deco(fn):
        try:
            torch._C._dispatch_find_schema_or_throw(f"natasha::{opname}", "")
        except Exception:
            return fn
        return register_fake(opname)(fn)
    return deco


def _state_ok(tensors, acc) -> bool:
    return all(t.dtype == acc and t.is_contiguous() for t in tensors)


def svrg_step(params: List[torch.Tensor], grads: List[torch.Tensor], anchor: List[torch.Tensor],
              avg_sum: List[torch.Tensor], *, lr: float, reg: float, snapshot_grads: Optional[List[torch.Tensor]] = None,
              mu: Optional[List[torch.Tensor]] = None, finalize: int = 0, center: Optional[List[torch.Tensor]] = None,
              prox_L: float = 0.0, prox_radius: float = 0.0, fused: Optional[bool] = None) -> torch.Tensor:
    """One pass over the list: d = g [- g_snap] [+ mu] + reg (x - anchor); avg_sum += x - anchor;
    x <- x - lr d, then the closed-form prox of prox_L max(0, ||x - center|| - prox_radius)^2 when
    ``center`` is given; ``finalize=m`` ends a sub-epoch (x <- anchor <- anchor + (avg_sum + x -
    anchor)/m, the mean of the sub-epoch's iterates; avg_sum <- 0). Returns [sum d^2, ||z - center||^2, kappa] without a host sync.

    ``params``/``grads``/``snapshot_grads`` share the parameter dtype; the state lists (mu, anchor,
    avg_sum, center) are fp32 for fp16/bf16/fp32 params and fp64 for fp64 params.
    """
    check_tensor_list("params", params)
    named = [("grads", grads), ("anchor", anchor), ("avg_sum", avg_sum)]
    named += [(n, t) for n, t in (("snapshot_grads", snapshot_grads), ("mu", mu), ("center", center)) if t is not None]
    for name, ts in named:
        check_tensor_list(name, ts, params[0].device if params else None)
        check_same_numels("params", params, name, ts)
    if isinstance(finalize, bool) or not isinstance(finalize, int) or finalize < 0:
        raise ValueError(f"finalize must be an int >= 0 (0, or m to end a sub-epoch), got {finalize!r}")
    lr, reg, prox_L, prox_radius = float(lr), float(reg), float(prox_L), float(prox_radius)
    if not params:
        return torch.tensor([0.0, 0.0, 1.0], dtype=torch.float32)
    acc = reference._acc_dtype(params)
    state = [t for t in (mu, anchor, avg_sum, center) if t is not None]
    grad_lists = [grads] + ([snapshot_grads] if snapshot_grads is not None else [])
    kernel_ok = (len({p.dtype for p in params}) == 1
                 and all(g.dtype == params[0].dtype for ts in grad_lists for g in ts)
                 and all(_state_ok(ts, acc) for ts in state))
    kernel_ok = kernel_ok and _has_kernel("svrg_step", params[0].device)
    if not use_fused(params, fused) or not kernel_ok:
        if fused is True and not kernel_ok:
            raise RuntimeError("svrg_step(fused=True): the kernels need one parameter dtype, grads of that "
                               "dtype and contiguous state lists of the accumulation dtype")
        return reference.svrg_step(list(params), list(grads), snapshot_grads, mu, list(anchor), list(avg_sum),
                                   lr, reg, finalize, center, prox_L, prox_radius)
    work, writeback = contiguous_inplace(params)
    out = torch.ops.natasha.svrg_step(work, contiguous(grads), None if snapshot_grads is None else contiguous(snapshot_grads),
                                      None if mu is None else list(mu), list(anchor), list(avg_sum), lr, reg, finalize,
                                      None if center is None else list(center), prox_L, prox_radius)
    writeback()
    return out


def oja_step(v: List[torch.Tensor], hv: List[torch.Tensor], scale: torch.Tensor, eta: float, *,
             fused: Optional[bool] = None) -> torch.Tensor:
    """w <- scale (w - eta H w) over the list in one pass (``v`` holds w, ``hv`` = H w, ``scale`` =
    1/||w|| as a 0-dim tensor); returns [||w_new||, Rayleigh quotient of scale*w] without a sync."""
    check_tensor_list("v", v)
    check_tensor_list("hv", hv, v[0].device if v else None)
    check_same_numels("v", v, "hv", hv)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise TypeError("scale must be a 1-element tensor (1/||v||, kept on the device to avoid a sync)")
    eta = float(eta)
    if not v:
        return torch.tensor([0.0, 0.0], dtype=torch.float32)
    acc = reference._acc_dtype(v)
    kernel_ok = (len({t.dtype for t in v}) == 1 and len({t.dtype for t in hv}) == 1
                 and all(t.dtype == acc for t in v) and scale.device == v[0].device)
    kernel_ok = kernel_ok and _has_kernel("oja_step", v[0].device)
    if not use_fused(v, fused) or not kernel_ok:
        if fused is True and not kernel_ok:
            raise RuntimeError("oja_step(fused=True): v must be fp32/fp64 (one dtype), hv one dtype, "
                               "scale on v's device")
        return reference.oja_step(list(v), list(hv), scale, eta)
    work, writeback = contiguous_inplace(v)
    out = torch.ops.natasha.oja_step(work, contiguous(hv), scale.reshape(()).to(acc), eta)
    writeback()
    return out


@_fake("svrg_step")
def _svrg_step_fake(params, grads, snapshot_grads, mu, anchor, avg_sum, lr, reg, finalize, center, prox_L,
                    prox_radius):
    return params[0].new_empty((3,), dtype=reference._acc_dtype(params))


@_fake("oja_step")
def _oja_step_fake(v, hv, scale, eta):
    return v[0].new_empty((2,), dtype=reference._acc_dtype(v))
