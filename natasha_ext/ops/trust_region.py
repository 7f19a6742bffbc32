"""Trust-region ops: the vector work of preconditioned Steihaug-Toint CG in the A-norm.

A CG iteration on the model m(s) = g^T s + 1/2 s^T B s inside ||s||_A <= radius costs one
curvature product Bp plus two list-wide passes:

* :func:`cg_dots` (reads p, Bp, r, a): p^T B p, r^T p, r^T A^{-1} Bp, Bp^T A^{-1} Bp;
* :func:`cg_step_` (reads s, r, p, Bp, a; writes s, r, p): s += alpha p, r += alpha Bp,
  z = r/a, p = -z + beta p, and the dot products of the next iteration's tests.

beta = r_{k+1}^T z_{k+1} / r_k^T z_k is known *before* the pass from the recurrence
r_{k+1}^T A^{-1} r_{k+1} = rz + 2 alpha u + alpha^2 w (u, w from cg_dots), which is what lets the
direction update share the pass with the s and r updates. :func:`tr_cg_init_` fuses the
RMSProp/Adagrad diagonal update (paper eqs. 2-3) with the CG start s = 0, r = g, p = -A^{-1} g.

State lists (v, a, s, r, p) are fp32 (fp64 for fp64 parameters); grads and Bp may be fp16/bf16.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (acc_dtype, check_same_numels, check_tensor_list, contiguous, mixed_dtypes,
                                       register_fake, state_ok, use_kernel)

TR_MODES = {"spherical": reference.TR_SPHERICAL, "rmsprop": reference.TR_RMSPROP,
            "adagrad": reference.TR_ADAGRAD}


def _use_kernel(op: str, fused: Optional[bool], inputs_name: str, inputs: List[torch.Tensor],
                state: List[tuple]) -> bool:
    """The kernels take one input dtype and contiguous state lists of its accumulation dtype."""
    acc = acc_dtype(inputs)
    refusals = [mixed_dtypes(inputs_name, inputs)] + [state_ok(n, ts, acc) for n, ts in state]
    return use_kernel(op, fused, list(inputs) + [t for _, ts in state for t in ts], refusals)


def _check(name, lists):
    ref_name, ref = lists[0]
    for n, ts in lists:
        check_tensor_list(n, ts)
        if ts is not ref:
            check_same_numels(ref_name, ref, n, ts)
    devs = {t.device for _, ts in lists for t in ts}
    if len(devs) > 1:
        raise RuntimeError(f"{name}: all tensors must share one device, got {sorted(map(str, devs))}")


@torch.no_grad()
def tr_cg_init_(v: List[torch.Tensor], a: List[torch.Tensor], s: List[torch.Tensor], r: List[torch.Tensor],
                p: List[torch.Tensor], grads: List[torch.Tensor], beta: float, eps: float, mode: str | int,
                *, fused: Optional[bool] = None) -> torch.Tensor:
    """Ellipsoid update (mode 'spherical' a=1, 'rmsprop' v=beta v+(1-beta)g^2, 'adagrad' v+=g^2;
    a = v + eps) fused with s=0, r=g, p=-g/a. Returns [g^T A^{-1} g, g^T g]."""
    m = TR_MODES.get(mode, -1) if isinstance(mode, str) else int(mode)
    if m not in (0, 1, 2):
        raise ValueError(f"mode must be one of {tuple(TR_MODES)}, got {mode!r}")
    _check("tr_cg_init_", [("grads", grads), ("v", v), ("a", a), ("s", s), ("r", r), ("p", p)])
    grads = contiguous(grads)
    if grads and _use_kernel("tr_cg_init_", fused, "grads", grads, [("v", v), ("a", a), ("s", s), ("r", r), ("p", p)]):
        return torch.ops.natasha.tr_cg_init_(v, a, s, r, p, grads, beta=float(beta), eps=float(eps), norm_mode=m)
    return reference.tr_cg_init_(v, a, s, r, p, grads, beta, eps, m)


@torch.no_grad()
def cg_dots(p: List[torch.Tensor], Bp: List[torch.Tensor], r: List[torch.Tensor], a: List[torch.Tensor],
            *, fused: Optional[bool] = None) -> torch.Tensor:
    """[p^T B p, r^T p, r^T A^{-1} Bp, Bp^T A^{-1} Bp] as a 1-D tensor of 4 (no host sync)."""
    _check("cg_dots", [("p", p), ("Bp", Bp), ("r", r), ("a", a)])
    Bp = contiguous(Bp)
    if Bp and _use_kernel("cg_dots", fused, "Bp", Bp, [("p", p), ("r", r), ("a", a)]):
        return torch.ops.natasha.cg_dots(p, Bp, r, a)
    return reference.cg_dots(p, Bp, r, a)


@torch.no_grad()
def cg_step_(s: List[torch.Tensor], r: List[torch.Tensor], p: List[torch.Tensor], Bp: List[torch.Tensor],
             a: List[torch.Tensor], alpha: float, beta: float, *, fused: Optional[bool] = None) -> torch.Tensor:
    """s += alpha p; r += alpha Bp; p = -r/a + beta p. Returns [r^T A^{-1} r, s^T A s, s^T A p, p^T A p]."""
    _check("cg_step_", [("s", s), ("r", r), ("p", p), ("Bp", Bp), ("a", a)])
    Bp = contiguous(Bp)
    if Bp and _use_kernel("cg_step_", fused, "Bp", Bp, [("s", s), ("r", r), ("p", p), ("a", a)]):
        return torch.ops.natasha.cg_step_(s, r, p, Bp, a, alpha=float(alpha), beta=float(beta))
    return reference.cg_step_(s, r, p, Bp, a, float(alpha), float(beta))


@register_fake("tr_cg_init_")
def _tr_cg_init_fake(v, a, s, r, p, grads, *, beta, eps, norm_mode):
    return grads[0].new_empty((2,), dtype=acc_dtype(grads))


@register_fake("cg_dots")
def _cg_dots_fake(p, Bp, r, a):
    return Bp[0].new_empty((4,), dtype=acc_dtype(Bp))


@register_fake("cg_step_")
def _cg_step_fake(s, r, p, Bp, a, *, alpha, beta):
    return Bp[0].new_empty((4,), dtype=acc_dtype(Bp))
