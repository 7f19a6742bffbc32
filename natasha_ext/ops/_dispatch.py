"""Choosing the fused or the reference path for a call, and argument plumbing shared by ops."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from natasha_ext import _backend


def fused_available(device: torch.device | str | None = None) -> bool:
    """True when the compiled kernels are loaded (for ``device``'s type when given)."""
    if device is None:
        return bool(_backend.FUSED_DEVICES)
    return torch.device(device).type in _backend.FUSED_DEVICES


def check_tensor_list(name: str, tensors: Sequence[torch.Tensor], device: Optional[torch.device] = None):
    """Raise a clear error for anything but a list of dense floating tensors on one device."""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single Tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise RuntimeError(f"{name}[{i}] is sparse ({t.layout}); sparse tensors are not supported")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected a floating-point dtype")
        dev = device if device is not None else tensors[0].device
        if t.device != dev:
            raise RuntimeError(f"{name}[{i}] is on {t.device} but {name}[0] is on {dev}; "
                               "all tensors of one call must share a device")


def check_same_numels(ref_name: str, ref: Sequence[torch.Tensor], name: str, other: Sequence[torch.Tensor]):
    if len(ref) != len(other):
        raise ValueError(f"{name} has {len(other)} tensors but {ref_name} has {len(ref)}")
    for i, (a, b) in enumerate(zip(ref, other)):
        if a.numel() != b.numel():
            raise ValueError(f"{name}[{i}] has {b.numel()} elements but {ref_name}[{i}] has {a.numel()}")


def use_fused(tensors: Sequence[torch.Tensor], fused: Optional[bool] = None) -> bool:
    """Decide the path: ``fused=None`` picks the kernels when they support the tensors' device,
    ``True`` requires them (clear error otherwise), ``False`` forces the reference."""
    if fused is False or _backend._BACKEND == "reference":
        if fused is True:
            raise RuntimeError("fused=True but NATASHA_EXT_BACKEND=reference")
        return False
    dev = tensors[0].device.type if len(tensors) else "cpu"
    ok = dev in _backend.FUSED_DEVICES
    if fused is True and not ok:
        why = _backend.LOAD_ERROR or f"no compiled kernels for device type {dev!r}"
        raise RuntimeError(f"fused=True but the natasha_ext kernels are not available ({why})")
    return ok


def contiguous_inplace(tensors: Sequence[torch.Tensor]):
    """Contiguous stand-ins for in-place outputs; returns (work, writeback) where writeback()
    copies results into the original non-contiguous tensors."""
    if all(t.is_contiguous() for t in tensors):
        return list(tensors), lambda: None
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def writeback():
        for t, w in zip(tensors, work):
            if w is not t:
                t.copy_(w)

    return work, writeback


def contiguous(tensors: Sequence[torch.Tensor]):
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def register_fake(opname: str):
    """Decorator: register a fake (meta) kernel for ``natasha::opname`` so torch.compile can
    trace the op; a no-op when the compiled library is not loaded."""
    def deco(fn):
        if _backend.LOADED:
            torch.library.register_fake(f"natasha::{opname}")(fn)
        return fn
    return deco
