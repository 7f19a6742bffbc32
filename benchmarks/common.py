"""Shared benchmark plumbing: parameter lists shaped like real models, timers, copy bandwidth."""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    """One row: time ``setup(tensors)()`` for a parameter-shaped tensor list.

    op: the op's name; variant: 'fused', 'foreach-warm', 'foreach-cold', 'compiled', 'per-tensor'
    or a peer's name; bytes_per_param: minimal memory traffic per parameter element (for GB/s);
    setup: builds inputs from a list of parameter-shaped fp32 tensors and returns the function
    to time (it must not allocate the inputs inside the timed function);
    role: 'fused' (the row the op's speed-up is about), 'baseline' (an unfused form a user could
    write instead: the fastest of these is the op's best_unfused) or 'other' (shown, not compared).
    """
    op: str
    variant: str
    bytes_per_param: int
    setup: Callable[[List[torch.Tensor]], Callable[[], object]]
    devices: tuple = ("cpu", "cuda")
    note: str = ""
    role: str = "other"


def model_shapes(spec: str) -> List[tuple]:
    """Parameter shapes of a torchvision model (resnet18: 62 tensors/11.7 M, resnet50: 161/25.6 M),
    optionally sliced like a Python list: 'resnet18[-16:]' is its last 16 tensors (7.7 M: layer4
    and the classifier, the list --quick uses so that compiling each op's foreach form stays short)."""
    import torchvision

    match = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", spec)
    if match is None:
        raise ValueError(f"model spec {spec!r}: expected a torchvision model name, optionally sliced as name[a:b]")
    name, lo, hi = match.groups()
    if not callable(getattr(torchvision.models, name, None)):
        raise ValueError(f"model spec {spec!r}: torchvision.models has no model {name!r}")
    shapes = [tuple(p.shape) for p in getattr(torchvision.models, name)().parameters()]
    if lo is None:
        return shapes
    return shapes[int(lo) if lo else None:int(hi) if hi else None]


def error_text(exc: BaseException) -> str:
    """An error cell: the exception's type and message on one line, at most 200 characters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def make_params(shapes, device, dtype=torch.float32, seed=0) -> List[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.5) -> float:
    """Median seconds per call: CUDA events on GPU, torch.utils.benchmark on CPU."""
    if device == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters, times = 10, []
        for _ in range(5):
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        return sorted(times)[len(times) // 2]
    from torch.utils.benchmark import Timer

    fn()
    return Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time).median


def machine_info(device: str) -> Dict[str, object]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
            "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
