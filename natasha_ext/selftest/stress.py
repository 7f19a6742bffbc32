"""The boundary cases where chunked kernels go wrong, sized per device from its chunk and launch
sizes: a tensor spanning two CUDA launches, more tensors than one launch holds, AdaHessian groups
straddling chunks and launches, Philox offsets inside a counter word and a block, reductions
over 1 / 256 / 257 / 512 chunks, 256 / 257 / 513 layers of per-layer sums, more than 2^31
elements, every op on a side stream with synchronisation forbidden, and every kernel run twice
(on CPU with 1 and with N threads) giving the same bits.

Cases that only matter for CUDA's launches (or would take minutes on a CPU) run on CUDA only.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

from natasha_ext.selftest import op_cases
from natasha_ext.selftest.compare import Check, Result, Runner, skipped
from natasha_ext.selftest.inputs import (ALL_DTYPES, CHUNK, CUDA_BLOCKS_PER_LAUNCH, Filler, clones, device_type,
                                         list_layouts, matrix_layouts)
from natasha_ext.selftest.tolerances import tolerance

CASES = {c.op: c for c in op_cases.OP_CASES}
#: ops that treat the list as one flat vector (the launch and chunk cases apply to them)
FLAT_OPS = ["rademacher_", "global_norm", "svrg_step", "oja_step", "hutchinson_diag_", "adahessian_step",
            "tr_cg_init_", "cg_dots", "cg_step_"]
#: ops that reduce over the list (the chunk-count cases apply to them)
REDUCTIONS = ["global_norm", "svrg_step", "oja_step", "tr_cg_init_", "cg_dots", "cg_step_"]
PER_LAYER = ["kfac_precondition", "kfac_smw_apply", "ang_combine_"]
PHILOX_OFFSETS = [1, 2, 3, 125, 126, 127, 2**32 + 1]


def _op_check(kind: str, op: str, device: str, dtype, variant: str, shapes, repeat=False, positive=False) -> Check:
    case = CASES[op]
    run = case.build(Filler(device, seed=1, positive=positive), dtype, shapes, False)
    tol = 0.0 if repeat else tolerance(dtype, case.kind)
    return Check("stress", f"{kind}: {op}", device, dtype, variant, run, tol, repeat=repeat)


def launch_boundaries(device: str) -> Iterator[Check]:
    """A tensor spanning two launches and more large tensors than one launch holds (CUDA)."""
    c = CHUNK["cuda"]
    layouts = {f"[5, {CUDA_BLOCKS_PER_LAUNCH}*{c}+3, 7]": [(5,), (CUDA_BLOCKS_PER_LAUNCH * c + 3,), (7,)],
               "100 x 200003": [(200003,)] * 100}
    for variant, shapes in layouts.items():
        for op in FLAT_OPS:
            yield _op_check("launches", op, device, torch.float32, variant, shapes, positive=True)


def adahessian_groups(device: str) -> Iterator[Check]:
    """Groups of 2, 31, 32, 33, 49, 100 and more than a chunk, each tensor crossing a chunk
    boundary; on CUDA also groups of 49 and 100 crossing a launch boundary."""
    c = CHUNK[device_type(device)]
    sizes = [2, 31, 32, 33, 49, 100, c + 3]
    shapes = [((c + 1) // g + 2, 1, g) for g in sizes]
    layouts = {f"groups {sizes[:-1]} + chunk+3, across a chunk": shapes}
    if device_type(device) == "cuda":
        span = CUDA_BLOCKS_PER_LAUNCH * c
        layouts["groups 49, 100 across a launch"] = [(span // 49 + 2, 1, 49), (span // 100 + 2, 1, 100)]
    for variant, shapes in layouts.items():
        for dtype in (torch.float32, torch.float16):
            yield _op_check("groups", "adahessian_step", device, dtype, variant, shapes)


def _hutchinson_exact(f: Filler, dtype, shapes, nc, offset=0) -> Runner:
    """diag = z * hz with alpha 1: exact, so fused and reference agree bit for bit."""
    hz = f.randns(shapes, dtype)
    diag = f.randns(shapes, torch.float64 if dtype == torch.float64 else torch.float32)

    def run(fused):
        d = clones(diag)
        op_cases.op("hutchinson_diag_")(d, hz, seed=99, offset=offset, fused=fused)
        return d
    return run


def philox_offsets(device: str) -> Iterator[Check]:
    """Counter offsets inside a word (1-3 mod 4) and a block (125-127 mod 128), bit for bit."""
    c = CHUNK[device_type(device)]
    shapes = [(1,), (127,), (0,), (129,), (513,), (c + 5,)]
    for offset in PHILOX_OFFSETS:
        for dtype in ALL_DTYPES:
            for op, build in (("rademacher_", functools.partial(op_cases.rademacher, offset=offset)),
                              ("hutchinson_diag_", functools.partial(_hutchinson_exact, offset=offset))):
                run = build(Filler(device, seed=2), dtype, shapes, False)
                yield Check("stress", f"philox offset: {op}", device, dtype, f"offset {offset}", run, 0.0)


def chunk_counts(device: str) -> Iterator[Check]:
    """One reduction over 1, 256, 257 and 512 chunks (each twice: the same bits), on positive
    inputs: a lost or doubled chunk moves the sum by 1/k of its value, far above the tolerance."""
    c = CHUNK[device_type(device)]
    ops = REDUCTIONS if device_type(device) == "cuda" else ["global_norm", "cg_dots"]
    for k in (1, 256, 257, 512):
        for op in ops:
            yield _op_check("chunks", op, device, torch.float32, f"{k} chunks", [(k * c,)], positive=True)
            if k >= 256:
                yield _op_check("repeat", op, device, torch.float32, f"{k} chunks", [(k * c,)], repeat=True)


def layer_counts(device: str) -> Iterator[Check]:
    """Per-layer sums over 256, 257 and 513 layers."""
    for n in (256, 257, 513):
        for op in PER_LAYER:
            yield _op_check("layers", op, device, torch.float32, f"{n} layers", [(2, 3)] * n)


def _alternate_threads(run: Runner, n: int) -> Runner:
    """Fused runs alternate between n threads and 1 thread (the CPU kernels promise the same bits)."""
    calls = [0]

    def alt(fused):
        threads = n if calls[0] % 2 == 0 else 1
        calls[0] += 1
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run(fused)
        finally:
            torch.set_num_threads(old)
    return alt


def repeats(device: str) -> Iterator[Check]:
    """Every op twice on its chunk-boundary inputs: bit-identical (CPU: n threads, then 1)."""
    n = max(2, min(8, os.cpu_count() or 2))
    for case in op_cases.OP_CASES:
        variant = "chunk boundary"
        if device_type(device) == "cpu":
            variant += f", {n} threads vs 1"
        shapes = _layout(case, device, "chunk boundary")
        check = _op_check("repeat", case.op, device, torch.float32, variant, shapes, repeat=True)
        if device_type(device) == "cpu":
            check.run = _alternate_threads(check.run, n)
        yield check


def _layout(case, device, name):
    return (matrix_layouts if case.matrices else list_layouts)(device)[name]


@contextlib.contextmanager
def _side_stream_no_sync():
    """A non-default stream, with any host synchronisation raising (torch's sync debug mode)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        torch.cuda.set_sync_debug_mode(old)
        torch.cuda.current_stream().wait_stream(side)


def _on_side_stream(run: Runner) -> Runner:
    def side(fused):
        if not fused:
            return run(False)
        with _side_stream_no_sync():
            return run(True)
    return side


def side_streams(device: str) -> Iterator[Check]:
    """Every op on a side stream under torch.cuda.set_sync_debug_mode("error") (CUDA)."""
    for case in op_cases.OP_CASES:
        for name in ("edge sizes" if not case.matrices else "edge shapes", "chunk boundary"):
            check = _op_check("side stream", case.op, device, torch.float32, name, _layout(case, device, name))
            check.run = _on_side_stream(check.run)
            yield check


def _rademacher_tail(device: str, n: int, seed: int = 5, offset: int = 3) -> Runner:
    """The first and last elements of an n-element fill against the same stream positions drawn
    as a short list at a shifted offset (the stream advances one counter per 128 elements)."""
    m = 5 + 128 * 32
    assert (n - m) % 128 == 0

    def run(fused):
        if fused:
            big = torch.empty(n, dtype=torch.float16, device=device)
            op_cases.op("rademacher_")([big], seed=seed, offset=offset, fused=True)
            out = [big[:4096].clone(), big[-m:].clone()]
            del big
            return out
        head, tail = torch.empty(4096, dtype=torch.float16, device=device), torch.empty(m, dtype=torch.float16,
                                                                                        device=device)
        op_cases.op("rademacher_")([head], seed=seed, offset=offset, fused=False)
        op_cases.op("rademacher_")([tail], seed=seed, offset=offset + (n - m) // 128, fused=False)
        return [head, tail]
    return run


def huge(device: str) -> Iterator[Check | Result]:
    """More than 2^31 elements of fp16 in one tensor (CUDA, 4.3 GB)."""
    n = 2**31 + 5 + 128 * 32
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device_type(device) == "cuda" else 0
    if free < 24 * 2**30:
        yield skipped("stress", "int64 indexing", device, torch.float16, "2^31+ elements",
                      f"needs 24 GiB free on {device}, {free / 2**30:.1f} GiB free")
        return
    yield Check("stress", "int64 indexing: rademacher_", device, torch.float16, f"{n} elements (head, tail)",
                _rademacher_tail(device, n), 0.0)

    def norm(fused):
        ones = torch.ones(n, dtype=torch.float16, device=device)
        return [op_cases.op("global_norm")([ones], fused=fused)]
    yield Check("stress", "int64 indexing: global_norm", device, torch.float16, f"{n} ones", norm,
                tolerance(torch.float16))


def stress_checks(device: str) -> Iterator[Check | Result]:
    """Every boundary case for ``device`` (CUDA gets the launch-sized ones)."""
    yield from adahessian_groups(device)
    yield from philox_offsets(device)
    yield from chunk_counts(device)
    yield from layer_counts(device)
    yield from repeats(device)
    if device_type(device) == "cuda":
        yield from launch_boundaries(device)
        yield from side_streams(device)
        yield from huge(device)
