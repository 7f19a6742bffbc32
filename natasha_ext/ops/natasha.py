"""Natasha ops: ``svrg_step`` (Natasha1.5's inner step) and ``oja_step`` (Oja's algorithm with
lazy normalisation). Specifications: :func:`natasha_ext.ops.reference.svrg_step` and
:func:`natasha_ext.ops.reference.oja_step`.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (acc_dtype, check_same_numels, check_tensor_list, contiguous, contiguous_inplace,
                                       dtype_is, mixed_dtypes, register_fake, same_device, state_ok, use_kernel)

__all__ = ["svrg_step_", "oja_step_", "svrg_step", "oja_step"]


@torch.no_grad()
def svrg_step_(params: List[torch.Tensor], grads: List[torch.Tensor], anchor: List[torch.Tensor],
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
    acc = acc_dtype(params)
    refusals = [mixed_dtypes("params", params), dtype_is("grads", grads, params[0].dtype)]
    if snapshot_grads is not None:
        refusals.append(dtype_is("snapshot_grads", snapshot_grads, params[0].dtype))
    refusals += [state_ok(n, ts, acc) for n, ts in (("mu", mu), ("anchor", anchor), ("avg_sum", avg_sum),
                                                    ("center", center)) if ts is not None]
    if not use_kernel("svrg_step_", fused, params, refusals):
        return reference.svrg_step(list(params), list(grads), snapshot_grads, mu, list(anchor), list(avg_sum),
                                   lr, reg, finalize, center, prox_L, prox_radius)
    work, writeback = contiguous_inplace(params)
    out = torch.ops.natasha.svrg_step_(work, contiguous(grads), None if snapshot_grads is None else contiguous(snapshot_grads),
                                       None if mu is None else list(mu), list(anchor), list(avg_sum),
                                       None if center is None else list(center), lr=lr, reg=reg, finalize=finalize,
                                       prox_L=prox_L, prox_radius=prox_radius)
    writeback()
    return out


@torch.no_grad()
def oja_step_(v: List[torch.Tensor], hv: List[torch.Tensor], scale: torch.Tensor, eta: float, *,
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
    refusals = [mixed_dtypes("v", v), mixed_dtypes("hv", hv), dtype_is("v", v, acc_dtype(hv)),
                same_device("scale", scale, v[0].device)]
    if not use_kernel("oja_step_", fused, v, refusals):
        return reference.oja_step(list(v), list(hv), scale, eta)
    work, writeback = contiguous_inplace(v)
    out = torch.ops.natasha.oja_step_(work, contiguous(hv), scale.reshape(()), eta=eta)
    writeback()
    return out


#: the names before the ATen-style `_` suffix (optimizers and user code call them)
svrg_step = svrg_step_
oja_step = oja_step_


@register_fake("svrg_step_")
def _svrg_step_fake(params, grads, snapshot_grads, mu, anchor, avg_sum, center, *, lr, reg, finalize, prox_L,
                    prox_radius):
    return params[0].new_empty((3,), dtype=acc_dtype(params))


@register_fake("oja_step_")
def _oja_step_fake(v, hv, scale, *, eta):
    return v[0].new_empty((2,), dtype=acc_dtype(hv))
