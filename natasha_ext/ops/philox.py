"""The optimizers' random stream: a Philox (seed, offset) pair kept in ``state_dict``.

Every draw advances the offset by the number of Philox counters it consumed, so a resumed run
continues with exactly the draws it would have made, on CPU and CUDA alike.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from natasha_ext.ops import foundation, reference


def _blocks_for(n: int) -> int:
    return (n + 127) >> 7


class PhiloxStream:
    """A counter-based random stream. ``seed=None`` draws the seed from torch's global
    generator, so ``torch.manual_seed`` makes runs reproducible."""

    def __init__(self, seed: Optional[int] = None):
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=None).item())
        if not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
        self.seed = seed
        self.offset = 0

    def rademacher_(self, tensors: Sequence[torch.Tensor], fused: Optional[bool] = None) -> None:
        """Fill ``tensors`` with +-1 and advance the stream."""
        foundation.rademacher_(tensors, self.seed, self.offset, fused=fused)
        self.offset += _blocks_for(sum(t.numel() for t in tensors))

    def sign(self) -> float:
        """One +-1 draw (host-side: it decides a branch, e.g. the direction of a kick)."""
        v = float(reference.rademacher_values(self.seed, self.offset, 0, 1)[0])
        self.offset += 1
        return v

    def state_dict(self) -> dict:
        return {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.offset = int(state["offset"])
