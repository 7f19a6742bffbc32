"""The awkward inputs: list layouts that cross the kernels' chunk and launch boundaries, and a
deterministic way to fill them (CPU generator, so CPU and CUDA runs see the same numbers)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

#: elements per chunk: csrc/cpu/chunks.h kChunk (CPU) and csrc/cuda/multi_tensor_apply.cuh kChunk
CHUNK = {"cpu": 16384, "cuda": 65536}
#: chunks (blocks) per CUDA launch: multi_tensor_apply.cuh kMaxBlocks
CUDA_BLOCKS_PER_LAUNCH = 256
#: more tensors than one CUDA launch's metadata holds (it takes ~110 at list depth 1)
MANY_TENSORS = 113
#: every floating dtype the ops take
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def device_type(device: str) -> str:
    return torch.device(device).type


def list_layouts(device: str) -> Dict[str, List[Shape]]:
    """Parameter-list layouts every list op runs on (name -> shapes)."""
    c = CHUNK[device_type(device)]
    return {
        "edge sizes": [(0,), (1,), (0,), (7,), (3, 5), (2, 3, 4), (0,)],   # empty first, between, last
        "chunk boundary": [(c - 1,), (c,), (c + 1,), (2 * c + 1,)],
        f"{MANY_TENSORS} tensors": [((i * 37) % 97 + 1,) for i in range(MANY_TENSORS)],
        "non-contiguous": [(0,), (5, 3), (1,), (c + 1,), (4, 0)],
    }


def matrix_layouts(device: str) -> Dict[str, List[Shape]]:
    """Layer lists (out, in) the K-FAC ops run on."""
    c = CHUNK[device_type(device)]
    return {
        "edge shapes": [(0, 4), (1, 1), (3, 5), (4, 0), (7, 3)],
        "chunk boundary": [(c // 256 + 1, 257)],                      # one layer just over a chunk
        f"{MANY_TENSORS} layers": [(3, 4)] * MANY_TENSORS,
        "non-contiguous": [(1, 1), (5, 3), (2, 6)],
    }


class Filler:
    """Deterministic random tensors, drawn in fp64 from one seeded generator on the device (CUDA
    lists reach 10^8 elements) and then cast, so every dtype sees the same values rounded."""

    def __init__(self, device: str, seed: int = 0, positive: bool = False):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.positive_only = positive    # every draw |N(0, 1)| + 0.1: sums without cancellation

    def _draw(self, shape: Shape) -> torch.Tensor:
        x = torch.randn(shape, generator=self.gen, dtype=torch.float64, device=self.device)
        return x.abs_().add_(0.1) if self.positive_only else x

    def _place(self, x: torch.Tensor, dtype: torch.dtype, noncontig: bool) -> torch.Tensor:
        """``x`` on the device in ``dtype``; ``noncontig``: as a strided view (every other element
        of a wider tensor) holding the same values."""
        if noncontig and x.dim() and x.numel():
            wide = torch.zeros(tuple(x.shape[:-1]) + (2 * x.shape[-1],), dtype=dtype, device=self.device)
            wide[..., ::2] = x
            return wide[..., ::2]
        return x.to(dtype)

    def randn(self, shape: Shape, dtype: torch.dtype, scale: float = 1.0, noncontig: bool = False) -> torch.Tensor:
        """scale * N(0, 1)."""
        return self._place(self._draw(shape) * scale, dtype, noncontig)

    def positive(self, shape: Shape, dtype: torch.dtype, low: float = 0.5, noncontig: bool = False) -> torch.Tensor:
        """low + |N(0, 1)|: denominators and diagonal preconditioners."""
        return self._place(self._draw(shape).abs() + low, dtype, noncontig)

    def randns(self, shapes: Sequence[Shape], dtype: torch.dtype, noncontig: bool = False, **kw) -> List[torch.Tensor]:
        return [self.randn(s, dtype, noncontig=noncontig, **kw) for s in shapes]

    def positives(self, shapes: Sequence[Shape], dtype: torch.dtype, **kw) -> List[torch.Tensor]:
        return [self.positive(s, dtype, **kw) for s in shapes]


def clones(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Copies keeping each tensor's strides (a non-contiguous input stays non-contiguous)."""
    return [torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).copy_(t) for t in ts]
