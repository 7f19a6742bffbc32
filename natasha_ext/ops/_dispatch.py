"""The one dispatch rule of the op wrappers, and argument plumbing shared by the ops.

Every wrapper in :mod:`natasha_ext.ops` ends in :func:`use_kernel`, which decides between the
compiled kernel (``torch.ops.natasha.*``) and the pure-PyTorch reference from the user's
``fused`` and the reasons the kernel cannot take the arguments (if any):

* ``fused=False``: the reference;
* ``fused=True``: the kernel, or a RuntimeError naming the op and the reason;
* ``fused=None``: the kernel when it can take the arguments, else the reference, and the reason
  is logged once per (op, reason) on the ``natasha_ext.ops`` logger at DEBUG level.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch

from natasha_ext import _backend
from natasha_ext.precision import accumulation_dtype

logger = logging.getLogger("natasha_ext.ops")

#: dtypes the compiled kernels are built for (float8 and the rest take the reference)
KERNEL_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))

_logged: set = set()


def fused_available(device: torch.device | str | None = None) -> bool:
    """True when the compiled kernels are loaded (for ``device``'s type when given)."""
    if device is None:
        return bool(_backend.FUSED_DEVICES)
    return torch.device(device).type in _backend.FUSED_DEVICES


def backend_refusal(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    """Why no compiled kernel can run on ``tensors``' device (None when one can)."""
    if _backend._BACKEND == "reference":
        return "NATASHA_EXT_BACKEND=reference"
    if not _backend.LOADED:
        return f"the compiled kernels are not available ({_backend.LOAD_ERROR})"
    dev = tensors[0].device.type if len(tensors) else "cpu"
    if dev not in _backend.FUSED_DEVICES:
        return f"compiled kernels are not available for device type {dev!r}"
    return None


def use_fused(tensors: Sequence[torch.Tensor], fused: Optional[bool] = None) -> bool:
    """The device-level part of the rule (optimizers resolve their ``fused`` with it):
    ``False`` -> False; ``True`` -> True or a RuntimeError; ``None`` -> whether kernels exist."""
    if fused is False:
        return False
    why = backend_refusal(tensors)
    if why is not None and fused is True:
        raise RuntimeError(f"fused=True but the natasha_ext kernels cannot run: {why}")
    return why is None


def use_kernel(op: str, fused: Optional[bool], tensors: Sequence[torch.Tensor],
               refusals: Iterable[Optional[str]] = ()) -> bool:
    """The one dispatch rule: True to run ``torch.ops.natasha.<op>``, False for the reference.

    ``tensors`` decide the device; ``refusals`` are the op's own reasons the kernel cannot take
    these arguments (None entries mean no objection), e.g. from :func:`mixed_dtypes`."""
    if fused is False:
        return False
    why = backend_refusal(tensors) or unsupported_dtype(tensors)
    if why is None:
        why = next((r for r in refusals if r is not None), None)
    if why is None:
        return True
    if fused is True:
        raise RuntimeError(f"{op}(fused=True): the kernel cannot take these arguments: {why}")
    _log_once(op, why)
    return False


def _log_once(op: str, why: str) -> None:
    if torch.compiler.is_compiling() or (op, why) in _logged:
        return
    _logged.add((op, why))
    logger.debug("%s: using the reference implementation (%s)", op, why)


# ---- reasons (None: no objection) ------------------------------------------------------------
def unsupported_dtype(tensors: Sequence[torch.Tensor], name: str = "tensors") -> Optional[str]:
    for i, t in enumerate(tensors):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name}[{i}] has dtype {t.dtype} (kernels take float16, bfloat16, float32, float64)"
    return None


def mixed_dtypes(name: str, tensors: Sequence[torch.Tensor]) -> Optional[str]:
    dts = {t.dtype for t in tensors}
    if len(dts) > 1:
        return f"{name} mixes dtypes {sorted(map(str, dts))} (the kernel takes one dtype per list)"
    return None


def dtype_is(name: str, tensors: Sequence[torch.Tensor], want: torch.dtype) -> Optional[str]:
    for i, t in enumerate(tensors):
        if t.dtype != want:
            return f"{name}[{i}] has dtype {t.dtype} but the kernel needs {want}"
    return None


def state_ok(name: str, tensors: Sequence[torch.Tensor], want: torch.dtype) -> Optional[str]:
    """State lists written in place: the accumulation dtype and contiguous."""
    why = dtype_is(name, tensors, want)
    if why is None:
        for i, t in enumerate(tensors):
            if not t.is_contiguous():
                return f"{name}[{i}] is not contiguous (state lists are updated in place)"
    return why


def same_device(name: str, t: torch.Tensor, device: torch.device) -> Optional[str]:
    if t.device != device:
        return f"{name} is on {t.device} but the lists are on {device}"
    return None


def acc_dtype(tensors) -> torch.dtype:
    return accumulation_dtype(tensors)


# ---- argument checks shared by the wrappers --------------------------------------------------
def check_tensor_list(name: str, tensors: Sequence[torch.Tensor], device: Optional[torch.device] = None):
    """Raise a clear error for anything but a list of dense floating tensors on one device.
    (Runs on every op call: one combined test per tensor, the message found only on failure.)"""
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single Tensor")
    if not tensors:
        return
    t0 = tensors[0]
    dev = device if device is not None else (t0.device if isinstance(t0, torch.Tensor) else None)
    strided, tensor = torch.strided, torch.Tensor
    for i, t in enumerate(tensors):
        if not (isinstance(t, tensor) and t.layout == strided and t.is_floating_point() and t.device == dev):
            _tensor_list_error(name, i, t, dev)


def _tensor_list_error(name: str, i: int, t, dev) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}[{i}] must be a Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise RuntimeError(f"{name}[{i}] is sparse ({t.layout}); sparse tensors are not supported")
    if not t.is_floating_point():
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected a floating-point dtype")
    raise RuntimeError(f"{name}[{i}] is on {t.device} but {name}[0] is on {dev}; "
                       "all tensors of one call must share a device")


def check_same_numels(ref_name: str, ref: Sequence[torch.Tensor], name: str, other: Sequence[torch.Tensor]):
    check_len(ref_name, ref, name, other)
    numel = torch.Tensor.numel
    if list(map(numel, ref)) == list(map(numel, other)):  # the usual case, without a Python loop
        return
    for i, (a, b) in enumerate(zip(ref, other)):
        if a.numel() != b.numel():
            raise ValueError(f"{name}[{i}] has {b.numel()} elements but {ref_name}[{i}] has {a.numel()}")


def check_len(ref_name: str, ref: Sequence, name: str, other: Sequence):
    if len(ref) != len(other):
        raise ValueError(f"{name} has {len(other)} entries but {ref_name} has {len(ref)}")


def contiguous_inplace(tensors: Sequence[torch.Tensor]):
    """Contiguous stand-ins for in-place outputs; returns (work, writeback) where writeback()
    copies results into the original non-contiguous tensors."""
    if all(map(torch.Tensor.is_contiguous, tensors)):
        return list(tensors), lambda: None
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]

    def writeback():
        for t, w in zip(tensors, work):
            if w is not t:
                t.copy_(w)

    return work, writeback


def contiguous(tensors: Sequence[torch.Tensor]):
    """Read-only inputs made contiguous for the kernels (autograd may hand back strided
    gradients, e.g. of channels_last conv weights)."""
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def readable(tensors: Sequence[torch.Tensor]):
    """Read-only inputs of kernels that read any strides on CPU (csrc/cpu/chunks.h read_chunk
    gathers a strided tensor chunk by chunk in cache, instead of a whole .contiguous() copy that
    writes a new tensor and reads it back: 10 ms of a ResNet-18 AdaHessian step for the transposed
    conv-weight Hz of the double backward); made contiguous for the CUDA kernels. The C++ side of
    the rule is natasha/args/tensor_lists.h check_read_list."""
    return [t if t.is_contiguous() or t.device.type == "cpu" else t.contiguous() for t in tensors]


def memory_order(tensors: Sequence[torch.Tensor]):
    """Read-only inputs of order-blind reductions (norms): a tensor whose elements fill a dense
    block in a permuted layout (the transposed weight gradients of PyTorch's conv double
    backward, channels_last) is passed as a 1-D view of that block in memory order, not copied;
    other strided tensors are made contiguous."""
    return [t if t.is_contiguous() else _dense_block(t) for t in tensors]


def _dense_block(t: torch.Tensor) -> torch.Tensor:
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:  # gaps or overlaps: not one dense block
            return t.contiguous()
        expected *= size
    return t.as_strided((t.numel(),), (1,))  # strides are >= 0: the storage offset is the block's start


def register_fake(opname: str):
    """Decorator: the fake (meta) kernel of ``natasha::opname``, registered next to its op's
    wrapper so torch.compile can trace the op (nothing to register without the library)."""
    def deco(fn):
        if _backend.LOADED:
            torch.library.register_fake(f"natasha::{opname}")(fn)
        return fn
    return deco
