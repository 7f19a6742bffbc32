"""Foundation ops: Rademacher fill from the Philox stream and the list-wide L2 norm."""
from __future__ import annotations

from typing import List, Optional

import torch

from natasha_ext.ops import reference
from natasha_ext.ops._dispatch import (acc_dtype, check_tensor_list, contiguous_inplace, memory_order, register_fake,
                                       use_kernel)


@torch.no_grad()
def rademacher_(tensors: List[torch.Tensor], seed: int, offset: int, *, fused: Optional[bool] = None) -> None:
    """Fill every tensor with +-1 drawn from the Philox stream (seed, offset), bit-identical on
    CPU, CUDA and the reference. The stream treats the list as one concatenated vector; the
    tensors may have different dtypes."""
    check_tensor_list("tensors", tensors)
    if not tensors:
        return
    if not use_kernel("rademacher_", fused, tensors):
        reference.rademacher_(tensors, seed, offset)
        return
    work, writeback = contiguous_inplace(tensors)
    torch.ops.natasha.rademacher_(work, seed=int(seed), offset=int(offset))
    writeback()


@torch.no_grad()
def global_norm(tensors: List[torch.Tensor], *, fused: Optional[bool] = None) -> torch.Tensor:
    """sqrt(sum_i ||t_i||^2) over the list as a 0-dim tensor (fp32; fp64 when tensors[0] is fp64),
    without a host sync. The tensors may have different dtypes."""
    check_tensor_list("tensors", tensors)
    if not tensors or not use_kernel("global_norm", fused, tensors):
        return reference.global_norm(list(tensors))
    return torch.ops.natasha.global_norm(memory_order(tensors))


@register_fake("rademacher_")
def _rademacher_fake(tensors, *, seed, offset):
    return None


@register_fake("global_norm")
def _global_norm_fake(tensors):
    return tensors[0].new_empty((), dtype=acc_dtype(tensors))
