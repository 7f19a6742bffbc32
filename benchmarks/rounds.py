"""Interleaved timing: round r times every variant once, in an order rotated by r, so that a slow
spell of a shared machine lands on all variants of a row alike instead of on whichever ran then.

A sample is the mean time per call over enough back-to-back calls to last ``sample_s``
(calibrated once from a single call). CPU: time.perf_counter around the calls (the ops are
synchronous). CUDA: events recorded around the calls on the current stream, after a
synchronize so that no earlier variant's work is still queued, and read after the end event
completes.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import torch


class CycleSteps(int):
    """Returned by a timed function that runs a whole cycle of an optimizer whose cycle length
    varies (Natasha2's outer iteration): the number of optimizer steps the call made, so that
    the sample reports seconds per step."""


def _timed(fn: Callable[[], object], calls: int, device: str):
    """(seconds for ``calls`` calls, optimizer steps they made: a CycleSteps result counts as its
    value, anything else as one)."""
    def run() -> int:
        steps = 0
        for _ in range(calls):
            out = fn()
            steps += int(out) if isinstance(out, CycleSteps) else 1
        return steps

    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps = run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, steps
    t0 = time.perf_counter()
    steps = run()
    return time.perf_counter() - t0, steps


def per_call_seconds(fn: Callable[[], object], calls: int, device: str) -> float:
    """Seconds per call (per optimizer step when ``fn`` returns CycleSteps)."""
    seconds, steps = _timed(fn, calls, device)
    return seconds / max(steps, 1)


def calls_per_sample(fn: Callable[[], object], device: str, sample_s: float, max_calls: int = 1000,
                     period: int = 1) -> int:
    """Calls in one sample: enough to last ``sample_s``, rounded up to a multiple of ``period``."""
    once = _timed(fn, 1, device)[0]
    calls = max(1, min(max_calls, math.ceil(sample_s / max(once, 1e-9))))
    return -(-calls // period) * period


def interleaved(fns: Dict[str, Callable[[], object]], device: str, rounds: int,
                sample_s: float, periods: Optional[Dict[str, int]] = None,
                on_sample: Optional[Callable[[str], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of every function, one sample per round each, in rotated order.

    ``periods``: name -> calls after which the function's cost repeats (an optimizer that
    refreshes its curvature every k steps); its samples span whole periods, so each holds the
    same share of the expensive calls wherever in the cycle it starts. ``on_sample(name)`` is
    called after each calibration and each sample (progress bars)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    periods = periods or {}
    tick = on_sample or (lambda name: None)
    calls = {}
    for name, fn in fns.items():
        calls[name] = calls_per_sample(fn, device, sample_s, period=periods.get(name, 1))
        tick(name)
    names = list(fns)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            samples[name].append(per_call_seconds(fns[name], calls[name], device))
            tick(name)
    return samples
