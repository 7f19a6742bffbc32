"""Running one check: the fused path against the reference, with the kernels it dispatched."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Outputs = List[torch.Tensor]
Runner = Callable[[bool], Outputs]   # run(fused) -> every tensor the call wrote or returned


@dataclass
class Result:
    """One row of the self-test: a check of ``name`` on ``device``/``dtype`` inputs of ``variant``."""
    check: str                  # "op", "stress", "optimizer" or "coverage"
    name: str                   # op or optimizer family
    device: str
    dtype: str
    variant: str                # which awkward inputs
    max_error: Optional[float]  # largest |fused - ref| / (1 + |ref|); None when it could not run
    tolerance: Optional[float]
    passed: bool
    message: str = ""
    kernels: List[str] = field(default_factory=list)   # natasha:: ops the fused run dispatched
    seconds: float = 0.0
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "FAIL")


class KernelTrace(TorchDispatchMode):
    """Records the natasha:: ops dispatched inside the ``with`` block (a fused=True call that
    quietly took the reference would dispatch none)."""

    def __init__(self):
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.name()) if hasattr(func, "name") else str(func)
        if name.startswith("natasha::"):
            op = name.split("::", 1)[1].split(".")[0]
            if op not in self.ops:
                self.ops.append(op)
        return func(*args, **(kwargs or {}))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _flat64(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def max_error(fused: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> Tuple[float, str]:
    """(largest element error, "" or why the outputs cannot be compared). NaN and inf must sit at
    the same places with the same sign; the error counts finite elements."""
    if len(fused) != len(ref):
        return float("inf"), f"fused returned {len(fused)} outputs, reference {len(ref)}"
    for i, (a, b) in enumerate(zip(fused, ref)):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return float("inf"), (f"output {i}: fused {a.dtype}{tuple(a.shape)} on {a.device} vs reference "
                                  f"{b.dtype}{tuple(b.shape)} on {b.device}")
    x, y = _flat64(fused), _flat64(ref)   # one pass over all outputs (lists hold 100s of tensors)
    fin = torch.isfinite(x)
    if not torch.equal(fin, torch.isfinite(y)):
        return float("inf"), "NaN/inf at other places than the reference's"
    if not bool(fin.all()):
        ox, oy = torch.where(fin, 0.0, x), torch.where(fin, 0.0, y)
        if not torch.equal(ox.isnan(), oy.isnan()) or not torch.equal(ox.nan_to_num(0.0), oy.nan_to_num(0.0)):
            return float("inf"), "NaN/inf of other kinds than the reference's"
    if x.numel() == 0:
        return 0.0, ""
    err = torch.where(fin, (x - y).abs() / (1 + y.abs()), 0.0)
    return err.max().item(), ""


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat.new_empty(flat.shape).copy_(flat).view(torch.uint8)   # new_empty: stride 1 even for size 1


def bitwise_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Tuple[float, str]:
    """(0 or inf, why): the two runs must agree bit for bit (a NaN payload included)."""
    if len(a) != len(b):
        return float("inf"), f"{len(a)} outputs vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf"), f"output {i}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not torch.equal(_bits(x), _bits(y)):
            diff = (x.double() - y.double()).abs().nan_to_num(float("inf")).max().item()
            return float("inf"), f"output {i} differs (largest difference {diff:.3g})"
    return 0.0, ""


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


@dataclass
class Check:
    """What to compare: ``run(True)`` (traced) against ``run(False)``, or against ``run(True)``
    again bit for bit when ``repeat``."""
    check: str
    name: str
    device: str
    dtype: torch.dtype
    variant: str
    run: Runner
    tol: float
    repeat: bool = False
    expect_kernel: bool = True


def skipped(check: str, name: str, device: str, dtype: torch.dtype, variant: str, why: str) -> Result:
    return Result(check, name, device, dtype_name(dtype), variant, None, None, True, f"skipped: {why}", skipped=True)


def run_check(c: Check) -> Result:
    """Run the check; exceptions become failed rows (the self-test goes on)."""
    t0 = time.perf_counter()
    res = Result(c.check, c.name, c.device, dtype_name(c.dtype), c.variant, None, c.tol, False)
    trace = KernelTrace()
    second = "second fused run" if c.repeat else "reference path"
    try:
        with trace:
            first = c.run(True)
        _sync(c.device)
        res.kernels = list(trace.ops)
        try:
            other = c.run(c.repeat)
            _sync(c.device)
        except Exception as exc:
            res.message = f"{second} raised {_error_text(exc)}"
            return res
    except Exception as exc:
        res.message = f"fused path raised {_error_text(exc)}"
        return res
    finally:
        res.seconds = time.perf_counter() - t0
    err, why = (bitwise_equal if c.repeat or c.tol == 0 else max_error)(first, other)
    res.max_error = err
    if why:
        res.message = why
    elif c.expect_kernel and not trace.ops:
        res.message = "fused=True dispatched no natasha:: kernel (it ran the reference)"
    elif err > c.tol:
        res.message = f"error {err:.3g} > tolerance {c.tol:.3g}"
    res.passed = not res.message
    return res
