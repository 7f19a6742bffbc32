"""Oja's algorithm for the minimum eigenvector of a Hessian from Hessian-vector products.

Natasha2 (Allen-Zhu, "Natasha 2: Faster non-convex optimization than SGD", NeurIPS 2018; as
written out by Liu, Liu, Liu & Li, "Implementing and evaluating Natasha2 with PyTorch", Columbia
University project report, undated, Alg. 1 lines 13-18 and Alg. 3 lines 3-9) runs
Oja's algorithm -- the online power method -- on I - eta H:

    v_0 = random unit vector,   v_{t+1} = (I - eta H) v_t / ||(I - eta H) v_t||,

whose top eigenvector is H's minimum eigenvector when eta * |lambda(H)| <= 1. Normalising every
step keeps fp32 from overflowing (Liu et al., Sec. 3.3). The fused :func:`natasha_ext.ops.oja_step`
folds the normalisation into the *next* step (H is linear, so H(w/||w||) = Hw/||w||): one pass
reads w and Hw once, writes w, and returns ||w_new|| and the Rayleigh quotient of w/||w||; the
norm stays a device tensor, so the loop has no host sync.

Choices (documented): the start vector is a Rademacher vector / sqrt(d) from the caller's Philox
stream (a random unit vector whose norm is known exactly, so no reduction is needed); every
iteration uses the same minibatch Hessian (the closure convention fixes one minibatch per
``step``), so this is the power method on the minibatch Hessian; the Rayleigh quotient that
decides Natasha2's kick is v_T^T H v_T with one more HVP at the final unit vector.

The step-size condition eta * |lambda(H)| <= 1 is checked one-sidedly: every iterate's Rayleigh
quotient u^T H u is a lower bound on lambda_max(H), so ``max_rayleigh`` > 1/eta proves that
eta * lambda_max(H) > 1 (then I - eta H can have its largest-magnitude eigenvalue at H's *top*
end and the iterates drift towards lambda_max instead of lambda_min). A violation with
1 < eta * lambda_max < 2 can go unseen; the power method still converges to lambda_min there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from natasha_ext import ops
from natasha_ext.ops import PhiloxStream
from natasha_ext.precision import accumulation_dtype


@dataclass
class OjaResult:
    """``vector``: unit vector (fp32 list, fp64 for fp64 params); ``rayleigh``: v^T H v as a
    0-dim tensor (no sync); ``hvps``: Hessian-vector products spent; ``iterations``: Oja steps;
    ``max_rayleigh``: the largest u^T H u over the start vector, every iterate and v (a lower
    bound on lambda_max(H), 0-dim tensor, no sync)."""
    vector: List[torch.Tensor]
    rayleigh: torch.Tensor
    hvps: int
    iterations: int
    max_rayleigh: torch.Tensor


def oja_min_eigenvector(hvp: Callable[[Sequence[torch.Tensor]], List[torch.Tensor]], like: Sequence[torch.Tensor], *,
                        eta: float, iters: int, rng: PhiloxStream, fused: Optional[bool] = None,
                        exclude: Sequence[int] = ()) -> OjaResult:
    """Run ``iters`` steps of Oja's algorithm on I - eta H and return the unit vector and its
    Rayleigh quotient. ``hvp(v)`` returns H v for a list shaped like ``like`` (e.g. a
    :class:`natasha_ext.curvature.HVP`); ``rng`` draws the start vector (and advances).

    ``exclude``: indices of tensors whose start component is zero (e.g. ``HVP.unused``, the
    parameters the loss does not reach). H has zero rows and columns there, so every iterate
    stays exactly zero on them and a step along v never moves them. The stream advances by the
    same amount either way."""
    like = list(like)
    if not like:
        raise ValueError("oja_min_eigenvector needs at least one tensor")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    acc = accumulation_dtype(like)
    w = [torch.empty(p.shape, dtype=acc, device=p.device) for p in like]
    rng.rademacher_(w, fused=fused)
    exclude = set(exclude)
    for i in exclude:
        w[i].zero_()
    d = sum(p.numel() for i, p in enumerate(like) if i not in exclude)
    if d == 0:  # nothing to search: a zero vector with Rayleigh quotient 0 (no negative curvature)
        zero = torch.zeros((), dtype=acc, device=like[0].device)
        return OjaResult(w, zero, 0, 0, zero)
    scale = torch.full((), 1.0 / math.sqrt(d), dtype=acc, device=like[0].device)
    as_param = (lambda ts: [t.to(p.dtype) for t, p in zip(ts, like)]) if like[0].dtype != acc else (lambda ts: ts)
    top = torch.full((), -math.inf, dtype=acc, device=like[0].device)
    for _ in range(iters):
        hw = hvp(as_param(w))
        out = ops.oja_step(w, hw, scale, eta, fused=fused)
        scale = out[0].reciprocal()
        top = torch.maximum(top, out[1].to(acc))  # Rayleigh quotient of this step's input
    v = torch._foreach_mul(w, scale)
    hv = hvp(as_param(v))
    rq = torch.zeros((), dtype=acc, device=like[0].device)
    for vi, hi in zip(v, hv):
        rq = rq + torch.dot(vi.reshape(-1), hi.reshape(-1).to(acc))
    return OjaResult(v, rq, iters + 1, iters, torch.maximum(top, rq))
