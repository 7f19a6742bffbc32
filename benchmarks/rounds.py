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
from typing import Callable, Dict, List

import torch


def per_call_seconds(fn: Callable[[], object], calls: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def calls_per_sample(fn: Callable[[], object], device: str, sample_s: float, max_calls: int = 1000) -> int:
    once = per_call_seconds(fn, 1, device)
    return max(1, min(max_calls, math.ceil(sample_s / max(once, 1e-9))))


def interleaved(fns: Dict[str, Callable[[], object]], device: str, rounds: int,
                sample_s: float) -> Dict[str, List[float]]:
    """Seconds per call of every function, one sample per round each, in rotated order."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    calls = {name: calls_per_sample(fn, device, sample_s) for name, fn in fns.items()}
    names = list(fns)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            samples[name].append(per_call_seconds(fns[name], calls[name], device))
    return samples
