"""K-FAC / ANG / IFANG ops: factor EMA, damped Kronecker apply, SMW low-rank apply, ANG combine.

Layers are passed as lists of 2-D matrices: a layer's gradient is T = [dW | db] of shape
(out, in [+1]) (conv kernels flattened to (out, C*kh*kw)). See the reference section in
:mod:`natasha_ext.ops.reference` for the exact math (K-FAC: Martens & Grosse, "Optimizing Neural
Networks with Kronecker-factored Approximate Curvature", 2015; ANG's slerp blend, eq. 7).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (acc_dtype, check_len, check_tensor_list, contiguous, mixed_dtypes,
                                       register_fake, use_kernel)

__all__ = ["kfac_factor_ema_", "kfac_precondition", "kfac_smw_apply", "ang_combine_", "ang_coefficients"]

ang_coefficients = reference.ang_coefficients


def _check_2d(name: str, ts: Sequence[torch.Tensor]):
    for i, t in enumerate(ts):
        if t.dim() != 2:
            raise ValueError(f"{name}[{i}] must be a 2-D matrix, got shape {tuple(t.shape)}")


def _check_layer_lists(grads: Sequence[torch.Tensor], **others: Sequence[torch.Tensor]):
    """grads: 2-D layer matrices; every other list: one 2-D matrix per layer on grads' device."""
    check_tensor_list("grads", grads)
    _check_2d("grads", grads)
    dev = grads[0].device if grads else None
    for name, ts in others.items():
        check_tensor_list(name, ts, dev)
        check_len("grads", grads, name, ts)
        _check_2d(name, ts)


def _not_contiguous(name: str, ts: Sequence[torch.Tensor]) -> Optional[str]:
    i = next((i for i, t in enumerate(ts) if not t.is_contiguous()), None)
    return None if i is None else f"{name}[{i}] is not contiguous (updated in place)"


@torch.no_grad()
def kfac_factor_ema_(factors: List[torch.Tensor], rows: List[torch.Tensor], scales: Sequence[float],
                     decay: float, *, fused: Optional[bool] = None) -> None:
    """factor_i <- decay * factor_i + (1 - decay) * scales[i] * rows_i^T rows_i (in place).

    One call per factor kind (all A factors, or all G factors). The product runs in BLAS/cuBLAS
    (addmm) with the EMA folded into its alpha/beta, so the factor is read and written once.
    rows may be fp16/bf16 (AMP); factors are fp32 (or fp64)."""
    check_tensor_list("factors", factors)
    check_tensor_list("rows", rows, factors[0].device if factors else None)
    check_len("factors", factors, "rows", rows)
    check_len("factors", factors, "scales", scales)
    _check_2d("rows", rows)
    for i, (f, x) in enumerate(zip(factors, rows)):
        if f.dim() != 2 or f.shape[0] != f.shape[1] or f.shape[0] != x.shape[1]:
            raise ValueError(f"factors[{i}] has shape {tuple(f.shape)} but rows[{i}] has shape "
                             f"{tuple(x.shape)}; expected factors[{i}] of shape ({x.shape[1]}, {x.shape[1]})")
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    if not factors:
        return
    if not use_kernel("kfac_factor_ema_", fused, list(factors) + list(rows), [_not_contiguous("factors", factors)]):
        reference.kfac_factor_ema_(list(factors), list(rows), [float(s) for s in scales], float(decay))
        return
    torch.ops.natasha.kfac_factor_ema_(list(factors), contiguous(rows), [float(s) for s in scales], decay=float(decay))


@torch.no_grad()
def kfac_precondition(grads: List[torch.Tensor], g_inv: List[torch.Tensor], a_inv: List[torch.Tensor], *,
                      fused: Optional[bool] = None):
    """(U, reductions): U_i = G_inv_i T_i A_inv_i and the [L, 3] reductions
    (<T,U>, ||U||^2, ||T||^2) that ANG and the KL clip need, computed in the same pass."""
    _check_layer_lists(grads, g_inv=g_inv, a_inv=a_inv)
    for i, (t, g, a) in enumerate(zip(grads, g_inv, a_inv)):
        if g.shape != (t.shape[0], t.shape[0]) or a.shape != (t.shape[1], t.shape[1]):
            raise ValueError(f"layer {i}: grads {tuple(t.shape)} needs g_inv ({t.shape[0]}, {t.shape[0]}) and "
                             f"a_inv ({t.shape[1]}, {t.shape[1]}), got {tuple(g.shape)} and {tuple(a.shape)}")
    if not grads or not use_kernel("kfac_precondition", fused, list(grads) + list(g_inv) + list(a_inv),
                                   [mixed_dtypes("grads", grads)]):
        return reference.kfac_precondition(list(grads), list(g_inv), list(a_inv))
    outs, red = torch.ops.natasha.kfac_precondition(contiguous(grads), contiguous(g_inv), contiguous(a_inv))
    return list(outs), red


@torch.no_grad()
def kfac_smw_apply(grads: List[torch.Tensor], ya: List[torch.Tensor], yg: List[torch.Tensor],
                   damping, *, fused: Optional[bool] = None):
    """(U, reductions) with U_i = (lam I + YG_i^T YG_i)^-1 T_i (lam I + YA_i^T YA_i)^-1 applied by
    Sherman-Morrison-Woodbury (rank k = rows of YA/YG; only k x k systems are solved).
    ``damping`` is one float or one per layer."""
    _check_layer_lists(grads, ya=ya, yg=yg)
    if isinstance(damping, (int, float)):
        damping = [float(damping)] * len(grads)
    damping = [float(d) for d in damping]
    check_len("grads", grads, "damping", damping)
    for i, (t, a, g, lam) in enumerate(zip(grads, ya, yg, damping)):
        if a.shape[1] != t.shape[1] or g.shape[1] != t.shape[0] or a.shape[0] != g.shape[0]:
            raise ValueError(f"layer {i}: grads {tuple(t.shape)} needs ya (k, {t.shape[1]}) and yg (k, {t.shape[0]}) "
                             f"with the same k, got {tuple(a.shape)} and {tuple(g.shape)}")
        if not lam > 0:
            raise ValueError(f"damping[{i}] must be > 0 (SMW divides by it), got {lam!r}")
    if not grads or not use_kernel("kfac_smw_apply", fused, list(grads) + list(ya) + list(yg), [mixed_dtypes("grads", grads)]):
        return reference.kfac_smw_apply(list(grads), list(ya), list(yg), damping)
    outs, red = torch.ops.natasha.kfac_smw_apply(contiguous(grads), contiguous(ya), contiguous(yg), damping)
    return list(outs), red


@torch.no_grad()
def ang_combine_(nat: List[torch.Tensor], grads: List[torch.Tensor], reductions: torch.Tensor,
                 scale: Optional[torch.Tensor] = None, lam: float = 0.0, per_layer: bool = False, *,
                 fused: Optional[bool] = None) -> torch.Tensor:
    """nat_i <- scale * (c1 nat_i + c2 grads_i): ANG's spherical blend (eq. 7) of the
    preconditioned direction and the gradient, with the eq. 7 fallback (plain gradient) when
    t^T G^-1 t <= 0. Returns the [L, 2] coefficients actually applied."""
    check_tensor_list("nat", nat)
    dev = nat[0].device if nat else None
    check_tensor_list("grads", grads, dev)
    check_len("nat", nat, "grads", grads)
    for i, (u, t) in enumerate(zip(nat, grads)):
        if u.shape != t.shape:
            raise ValueError(f"nat[{i}] has shape {tuple(u.shape)} but grads[{i}] has {tuple(t.shape)}")
    if reductions.dim() != 2 or reductions.shape != (len(nat), 3):
        raise ValueError(f"reductions must have shape ({len(nat)}, 3), got {tuple(reductions.shape)}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    if scale is None:
        scale = torch.ones((), dtype=reductions.dtype, device=reductions.device)
    if not nat:
        return reductions.new_zeros((0, 2))
    refusals = [_not_contiguous("nat", nat), mixed_dtypes("nat + grads", list(nat) + list(grads)),
                None if reductions.device == nat[0].device else f"reductions is on {reductions.device}",
                None if nat[0].is_cuda or scale.device.type == "cpu" else "scale must be a CPU tensor for CPU lists"]
    if not use_kernel("ang_combine_", fused, list(nat) + list(grads) + [reductions], refusals):
        return reference.ang_combine_(list(nat), list(grads), reductions, scale, float(lam), bool(per_layer))
    return torch.ops.natasha.ang_combine_(list(nat), contiguous(grads), reductions.contiguous(), scale.reshape(()),
                                          lam=float(lam), per_layer=bool(per_layer))


@register_fake("kfac_factor_ema_")
def _ema_fake(factors, rows, scales, *, decay):
    return None


@register_fake("kfac_precondition")
def _pre_fake(grads, g_inv, a_inv):
    return [torch.empty_like(t) for t in grads], grads[0].new_empty((len(grads), 3), dtype=acc_dtype(grads))


@register_fake("kfac_smw_apply")
def _smw_fake(grads, ya, yg, damping):
    return [torch.empty_like(t) for t in grads], grads[0].new_empty((len(grads), 3), dtype=acc_dtype(grads))


@register_fake("ang_combine_")
def _combine_fake(nat, grads, reductions, scale, *, lam, per_layer):
    return reductions.new_empty((len(nat), 2))
