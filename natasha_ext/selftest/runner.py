"""Which checks run on a device, in which order, and the check that every kernel was reached."""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import torch

from natasha_ext.selftest.compare import Check, Result, run_check
from natasha_ext.selftest.environment import kernel_table
from natasha_ext.selftest.inputs import Filler, list_layouts, matrix_layouts
from natasha_ext.selftest.op_cases import OP_CASES
from natasha_ext.selftest.optimizer_cases import OPTIMIZER_CASES, OPTIMIZER_DTYPES, STEPS, optimizer_runner
from natasha_ext.selftest.stress import stress_checks
from natasha_ext.selftest.tolerances import tolerance


def op_checks(device: str) -> Iterator[Check]:
    """Every op x dtype x awkward list layout, fused against reference."""
    for case in OP_CASES:
        layouts = (matrix_layouts if case.matrices else list_layouts)(device)
        for dtype in case.dtypes:
            for variant, shapes in layouts.items():
                run = case.build(Filler(device), dtype, shapes, variant == "non-contiguous")
                yield Check("op", case.op, device, dtype, variant, run, tolerance(dtype, case.kind))


def optimizer_checks(device: str, quick: bool) -> Iterator[Check]:
    """A few steps of every optimizer family, fused against reference."""
    for case in OPTIMIZER_CASES:
        for dtype in OPTIMIZER_DTYPES[:1] if quick else OPTIMIZER_DTYPES:
            yield Check("optimizer", case.title, device, dtype, f"{STEPS} steps", optimizer_runner(case, device, dtype),
                        tolerance(dtype, "optimizer"))


def coverage(device: str, results: Sequence[Result]) -> Result:
    """Passes when every natasha:: op with a kernel for the device was dispatched by some check."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    compiled = {op for op, keys in kernel_table().items() if keys[key]}
    reached = {op for r in results if r.device == device for op in r.kernels}
    missed = sorted(compiled - reached)
    return Result("coverage", "natasha:: kernels reached", device, "-", "all checks", None, None, not missed,
                  f"never dispatched: {', '.join(missed)}" if missed else "", kernels=sorted(compiled & reached))


def run_selftest(devices: Sequence[str], quick: bool = False,
                 on_result: Optional[Callable[[Result], None]] = None) -> List[Result]:
    """All checks on every device; ``quick`` leaves out the boundary cases and the fp64 optimizer
    runs. ``on_result`` sees each result as it comes (progress output)."""
    results: List[Result] = []
    for device in devices:
        first = len(results)
        checks = [op_checks(device), optimizer_checks(device, quick)]
        if not quick:
            checks.insert(1, stress_checks(device))
        for group in checks:
            for item in group:   # one check's inputs alive at a time (CUDA cases are large)
                res = item if isinstance(item, Result) else run_check(item)
                results.append(res)
                if on_result:
                    on_result(res)
        cov = coverage(device, results[first:])
        results.append(cov)
        if on_result:
            on_result(cov)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return results
