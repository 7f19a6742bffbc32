"""Hutchinson's estimator of the Hessian diagonal and AdaHessian's spatial average
(Attias, Cadei & Novakovic, "Discussion on the viability of a modern second order method in non-convex
optimization training a deep convolutional neural network" (EPFL, undated), eqs. 8-9; the same
equations as Yao et al., "ADAHESSIAN: an adaptive second order optimizer for machine learning", 2020).

    diag(H) = E_z[z * (H z)],   z Rademacher (+-1 with probability 1/2 each)

The probes come from a :class:`~natasha_ext.ops.PhiloxStream`, so a probe is fully described by
the stream's (seed, offset) at the draw: kernels regenerate z from it instead of storing it, and
a resumed run draws the same probes.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from natasha_ext import ops
from natasha_ext.ops.adahessian import hutchinson_diag_, spatial_group_size
from natasha_ext.ops.reference import _group_mean
from natasha_ext.precision import accumulation_dtype


def rademacher_probe(params: Sequence[torch.Tensor], rng: ops.PhiloxStream, fused: Optional[bool] = None
                     ) -> Tuple[List[torch.Tensor], int]:
    """A Rademacher vector shaped like ``params`` drawn from ``rng``; returns (z, offset of the draw)."""
    z = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    offset = rng.offset
    rng.rademacher_(z, fused=fused)
    return z, offset


def hutchinson_diagonal(hvp: Callable[[List[torch.Tensor]], List[torch.Tensor]], params: Sequence[torch.Tensor],
                        rng: ops.PhiloxStream, n_samples: int = 1, fused: Optional[bool] = None
                        ) -> List[torch.Tensor]:
    """Estimate diag(H) as (1/n) sum_s z_s * (H z_s) with ``hvp(v) = H v`` (e.g. a
    :class:`~natasha_ext.curvature.HVP`). The error of each entry shrinks like 1/sqrt(n): its
    variance is sum_{j != i} H_ij^2 / n. Exact for a diagonal H with any n. Returns fp32
    tensors (fp64 for fp64 params)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    params = list(params)
    diag = [torch.zeros(p.shape, dtype=accumulation_dtype(p), device=p.device) for p in params]
    for s in range(n_samples):
        z, offset = rademacher_probe(params, rng, fused)
        hz = hvp(z)
        del z  # the kernel regenerates it from (seed, offset)
        hutchinson_diag_(diag, hz, rng.seed, offset, alpha=1.0 / n_samples, accumulate=s > 0, fused=fused)
    return diag


def spatial_average(d: torch.Tensor, block_size: Optional[int] = None, abs_first: bool = False) -> torch.Tensor:
    """AdaHessian's D^(s) for one tensor (Attias et al., eq. 9; Yao et al., Algorithm 1): the mean of
    D over each conv kernel (all dims after the first two, for 3-D, 4-D, 5-D ... weights) or over
    blocks of ``block_size`` consecutive elements of 1-D/2-D tensors, signed as in eq. 9.
    ``abs_first=True`` takes the mean of |D| instead (Yao et al.'s released code). Same shape as ``d``."""
    g = spatial_group_size(d.shape, block_size)
    flat = d.reshape(-1)
    return _group_mean(flat.abs() if abs_first else flat, g).view(d.shape)
