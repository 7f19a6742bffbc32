"""Pure-PyTorch references of every natasha op: the specification the kernels must match.

Each function has the signature of its ``torch.ops.natasha.*`` op (tensor lists in, in-place
where the op is in-place, scalars out as 0-dim tensors). They are also the fallback path when
the compiled extension is absent. Sections follow ``csrc/ops.cpp``.
"""
from __future__ import annotations

from typing import List

import torch

# =============================================================================================
# foundation: Philox4x32-10 stream, rademacher_, global_norm
# =============================================================================================
_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, b: int):
    """(lo, hi) 32-bit halves of a*b for int64 tensors a in [0, 2^32) and a 32-bit constant b,
    computed with 16-bit splits so no intermediate leaves int64's exact range."""
    x = (a & 0xFFFF) * b          # < 2^48
    y = (a >> 16) * b             # < 2^48
    s = ((y & 0xFFFF) << 16) + x  # < 2^49
    return s & _MASK, ((y >> 16) + (s >> 32)) & _MASK


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> torch.Tensor:
    """Philox4x32-10 on int64 tensors holding uint32 words; returns an [..., 4] int64 tensor."""
    for r in range(10):
        lo0, hi0 = _mulhilo(c0, _M0)
        lo1, hi1 = _mulhilo(c2, _M1)
        ka, kb = (k0 + r * _W0) & _MASK, (k1 + r * _W1) & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ ka, lo1, hi0 ^ c3 ^ kb, lo0
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_blocks(seed: int, offset: int, first_block: int, n_blocks: int, device=None) -> torch.Tensor:
    """The [n_blocks, 4] words of Philox counters offset+first_block ... (see natasha/philox.h)."""
    c = torch.arange(n_blocks, dtype=torch.int64, device=device) + (offset + first_block)
    zero = torch.zeros_like(c)
    return philox4x32_10(c & _MASK, c >> 32, zero, zero, seed & _MASK, (seed >> 32) & _MASK)


def rademacher_values(seed: int, offset: int, first: int, n: int, device=None) -> torch.Tensor:
    """Signs (+1./-1., fp32) of stream elements first .. first+n-1."""
    if n == 0:
        return torch.empty(0, device=device)
    k = torch.arange(first, first + n, dtype=torch.int64, device=device)
    b0 = first >> 7
    words = philox_blocks(seed, offset, b0, ((first + n - 1) >> 7) - b0 + 1, device)
    w = words[(k >> 7) - b0, (k >> 5) & 3]
    return ((w >> (k & 31)) & 1).to(torch.float32) * 2 - 1


def rademacher_(tensors: List[torch.Tensor], seed: int, offset: int) -> None:
    """Fill each tensor with +-1; element k of the concatenated list takes bit (k & 31) of word
    ((k >> 5) & 3) of Philox counter offset + (k >> 7) under key (seed lo, seed hi)."""
    first = 0
    for t in tensors:
        n = t.numel()
        if n:
            t.copy_(rademacher_values(seed, offset, first, n, t.device).view_as(t))
        first += n


def _acc_dtype(tensors):
    return torch.float64 if tensors and tensors[0].dtype == torch.float64 else torch.float32


def global_norm(tensors: List[torch.Tensor]) -> torch.Tensor:
    """sqrt(sum_i ||t_i||^2), accumulated in fp32 (fp64 for fp64 lists), as a 0-dim tensor."""
    acc = _acc_dtype(tensors)
    if not tensors:
        return torch.zeros((), dtype=acc)
    total = torch.zeros((), dtype=acc, device=tensors[0].device)
    for t in tensors:
        total = total + t.to(acc).square().sum()
    return total.sqrt()
