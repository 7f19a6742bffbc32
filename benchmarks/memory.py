"""Peak memory of a training loop and a leak check, each measured in a fresh process.

CPU: torch keeps no statistics of its CPU allocator (and tracemalloc does not see torch's
allocations), so the probe reads the process's resident set from /proc/self/status: the
high-water mark VmHWM, reset through /proc/self/clear_refs once the model, data and optimizer
are built, minus VmRSS at that moment. Where clear_refs cannot be written, the growth of
resource.getrusage's ru_maxrss is used instead (a lower bound: the import's peak may hide part
of it). CUDA: torch.cuda.max_memory_allocated above the memory allocated before the first step.
The process is fresh so that no earlier row's peak or freed-but-kept pages count.

Leak check: resident (CUDA: allocated) memory after step ``early`` against after step ``late``,
each over a window of w = (late - early) / 10 steps: growth is the lowest reading of the last w
steps minus the highest of the w steps from ``early``. A loop that keeps something per step (a
``create_graph`` gradient's graph kept alive, a list that grows) lifts every later reading; a
clean loop's readings wander within one band (the allocator keeping or returning pages), so its
growth stays at or below zero.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
from typing import Callable, Dict

import torch

# growth above this many MB and above this share of the peak flags a leak
LEAK_TOL_MB = 4.0
LEAK_TOL_REL = 0.05


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


class _Meter:
    """Current and peak bytes of one device since reset()."""

    def __init__(self, device: str):
        self.device = device

    def reset(self) -> str:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return "torch.cuda.max_memory_allocated above the allocation before the first step"
        self.base = _status_kb("VmRSS") * 1024
        if _reset_hwm():
            self.peak_fn = lambda: _status_kb("VmHWM") * 1024
            return "RSS high-water (VmHWM, reset via /proc/self/clear_refs) above VmRSS before the first step"
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_fn = lambda: self.base + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        return "ru_maxrss growth (lower bound: clear_refs not writable)"

    def current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_kb("VmRSS") * 1024

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else self.peak_fn()


def _probe(make_step: Callable[[], Callable[[], object]], device: str, threads: int, early: int,
           late: int) -> Dict[str, object]:
    torch.set_num_threads(threads)
    step = make_step()
    meter = _Meter(device)
    method = meter.reset()
    w = max(1, (late - early) // 10)
    at = []
    for i in range(1, late + 1):
        step()
        if early <= i < early + w or i > late - w:
            at.append(meter.current())
    mb = 2.0 ** 20
    # the lowest reading of the last w steps above the highest of the first w from step early:
    # a clean loop's readings wander inside one band (<= 0), a leak lifts the whole band
    return {"peak_MB": (meter.peak() - meter.base) / mb, "mem_early_MB": (max(at[:w]) - meter.base) / mb,
            "mem_late_MB": (min(at[w:]) - meter.base) / mb, "method": method}


def leaks(growth_mb: float, peak_mb: float) -> bool:
    """A leak: growth beyond both the absolute and the relative tolerance."""
    return growth_mb > max(LEAK_TOL_MB, LEAK_TOL_REL * peak_mb)


def memory_probe(make_step: Callable[[], Callable[[], object]], device: str = "cpu", threads: int = 1,
                 early: int = 10, late: int = 200, timeout_s: float = 1800.0) -> Dict[str, object]:
    """Run ``make_step()()`` ``late`` times in a fresh process; ``make_step`` must be picklable
    (a module-level function or a functools.partial of one) and builds the model, data and
    optimizer there. Returns peak_MB (above the memory before the first step), mem_early_MB (the
    highest reading of the window from step ``early``), mem_late_MB (the lowest of the window
    ending at step ``late``), growth_MB (late - early), leak (bool) and method (how it was measured)."""
    if not 1 <= early or late < early + 2:
        raise ValueError(f"need 1 <= early and late >= early + 2, got early={early}, late={late}")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        out = pool.submit(_probe, make_step, device, threads, early, late).result(timeout=timeout_s)
    out["growth_MB"] = out["mem_late_MB"] - out["mem_early_MB"]
    out["leak"] = leaks(out["growth_MB"], out["peak_MB"])
    return out
