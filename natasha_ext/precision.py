"""The package's one precision rule: optimizer state and reductions accumulate in fp32 for
fp16/bf16/fp32 values and in fp64 for fp64 values (as torch's fused Adam keeps fp32 state for
reduced-precision parameters). Kernels, references and optimizers all ask this module.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["accumulation_dtype"]


def accumulation_dtype(x: Union[torch.dtype, torch.Tensor, Sequence[torch.Tensor]]) -> torch.dtype:
    """fp64 for fp64 input, fp32 otherwise. ``x`` is a dtype, a tensor, or a list of tensors
    (the list's first tensor decides; an empty list gives fp32)."""
    if isinstance(x, torch.dtype):
        dtype = x
    elif isinstance(x, torch.Tensor):
        dtype = x.dtype
    else:
        dtype = x[0].dtype if len(x) else torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32
