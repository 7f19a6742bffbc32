"""The op contract for the foundation ops rademacher_ and global_norm."""
import os
import subprocess
import sys

import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import reference as R
from tests.helpers import devices, dtypes, list_shapes, requires_cuda, requires_fused


def test_fused_available_after_build():
    if os.environ.get("NATASHA_EXT_EXPECT_FUSED") == "1":
        from natasha_ext import _backend

        assert ops.fused_available(), f"kernels expected after the build but not loaded: {_backend.LOAD_ERROR}"
    else:
        assert isinstance(ops.fused_available(), bool)


def _kat(c, k):
    z = torch.zeros(1, dtype=torch.int64)
    out = R.philox4x32_10(*(z + x for x in c), k[0], k[1])
    return [int(v) for v in out[0]]


def library_runs_parallel_regions(path: str) -> bool:
    """Whether a compiled library holds OpenMP parallel regions: GCC/Clang emit a call to
    GOMP_parallel for each, and at::parallel_for (a header template) has one only when compiled
    with -fopenmp; without it every CPU kernel runs on one thread."""
    with open(path, "rb") as f:
        return b"GOMP_parallel" in f.read()


@requires_fused
@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch parallelises with OpenMP on Linux only; elsewhere the kernels use its native pool")
def test_cpu_kernels_are_built_to_run_on_torchs_threads():
    """(A torch extension built with at::parallel_for but without -fopenmp has no GOMP_parallel:
    checked on one when this test was written; the build before 2026-12-01 was such a library.)"""
    from natasha_ext import _backend

    assert library_runs_parallel_regions(_backend.LIBRARY_PATH), (
        f"{_backend.LIBRARY_PATH} has no OpenMP parallel region: built without -fopenmp, its CPU kernels run serially")


def test_philox_known_answers():
    # Random123 known-answer vectors for Philox4x32-10.
    assert _kat([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _kat([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _kat([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def _lists(device, dtype):
    return [[torch.empty(s, device=device, dtype=dtype) for s in shapes] for shapes in list_shapes()]


@requires_fused
@pytest.mark.parametrize("device", devices())
def test_rademacher_fused_matches_reference_bitwise(device):
    for dtype in dtypes(device):
        for ts in _lists(device, dtype):
            ref = [t.clone() for t in ts]
            ops.rademacher_(ts, 987654321987, 77, fused=True)
            R.rademacher_(ref, 987654321987, 77)
            for a, b in zip(ts, ref):
                assert torch.equal(a, b), (dtype, a.shape)
                assert a.numel() == 0 or set(a.unique().tolist()) <= {-1.0, 1.0}


@requires_cuda
@requires_fused
def test_rademacher_identical_across_devices():
    shapes = [(5, 3, 3, 3), (1000,), (65537,)]
    cpu = [torch.empty(s) for s in shapes]
    gpu = [torch.empty(s, device="cuda") for s in shapes]
    ops.rademacher_(cpu, 42, 9)
    ops.rademacher_(gpu, 42, 9)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_rademacher_stream_layout_and_reproducibility():
    a = torch.empty(1000)
    b = torch.empty(1000)
    ops.rademacher_([a], 5, 3)
    ops.rademacher_([b], 5, 3)
    assert torch.equal(a, b)  # same (seed, offset) -> same draw
    # element k uses counter offset + k // 128: shifting the offset by one skips 128 elements
    c = torch.empty(1000 - 128)
    ops.rademacher_([c], 5, 4)
    assert torch.equal(a[128:], c)
    # a list is one concatenated stream
    parts = [torch.empty(300), torch.empty(700)]
    ops.rademacher_(parts, 5, 3)
    assert torch.equal(torch.cat(parts), a)
    # different seeds decorrelate, and the draw is balanced
    d = torch.empty(1000)
    ops.rademacher_([d], 6, 3)
    assert (a == d).float().mean().item() == pytest.approx(0.5, abs=0.06)
    big = torch.empty(200_000)
    ops.rademacher_([big], 11, 0)
    assert abs(big.mean().item()) < 0.01


def test_philox_stream_advances_and_round_trips():
    s = ops.PhiloxStream(seed=123)
    a, b = torch.empty(300), torch.empty(300)
    s.rademacher_([a])
    assert s.offset == 3
    state = s.state_dict()
    s.rademacher_([b])
    assert not torch.equal(a, b)
    s2 = ops.PhiloxStream(seed=1)
    s2.load_state_dict(state)
    c = torch.empty(300)
    s2.rademacher_([c])
    assert torch.equal(b, c)
    signs = [s.sign() for _ in range(200)]
    assert set(signs) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="seed"):
        ops.PhiloxStream(seed=-1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)])
def test_global_norm(device, fused):
    for dtype in dtypes(device):
        for ts in _lists(device, dtype):
            for t in ts:
                t.normal_()
            got = ops.global_norm(ts, fused=fused)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert got.dtype == acc and got.dim() == 0 and got.device.type == device
            want = torch.sqrt(sum((t.double() ** 2).sum() for t in ts)) if ts else torch.tensor(0.0)
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol)


@requires_fused
def test_global_norm_deterministic_across_thread_counts():
    ts = [torch.randn(70001), torch.randn(3, 40000)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.global_norm(ts, fused=True)
        torch.set_num_threads(max(2, old))
        many = ops.global_norm(ts, fused=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)])
def test_non_contiguous_inputs(fused):
    base = torch.randn(64, 33)
    view = base.t()  # non-contiguous
    assert not view.is_contiguous()
    torch.testing.assert_close(ops.global_norm([view], fused=fused), base.norm())
    m = torch.zeros(40, 50)[:, ::2]
    ref = m.contiguous().clone()
    ops.rademacher_([m], 3, 0, fused=fused)
    R.rademacher_([ref], 3, 0)
    assert torch.equal(m, ref)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)])
def test_global_norm_reads_permuted_dense_layouts_in_place(fused):
    """Norms are blind to element order: a tensor filling a dense block in a permuted layout
    (conv double backward's transposed weight gradients, channels_last, size-1 dims with any
    stride) is reduced as a 1-D view of its memory, not copied; gapped or overlapping layouts are
    copied. Every case equals the norm of its values."""
    from natasha_ext.ops._dispatch import memory_order

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, 3, 3, generator=g)
    dense = [base.transpose(0, 1), base.permute(3, 1, 0, 2), base.contiguous(memory_format=torch.channels_last),
             torch.randn(4, 1, 7, generator=g).as_strided((4, 1, 7), (7, 99, 1)), base[:, :, 1:2].transpose(0, 1)[:, :, 0]]
    gapped = [base[:, ::2], base[1:4, :, :, :2].transpose(0, 1), torch.randn(3, generator=g).expand(4, 3)]
    for t in dense + gapped:
        (view,) = memory_order([t])
        want = torch.sqrt((t.double() ** 2).sum())
        torch.testing.assert_close(ops.global_norm([t, torch.ones(2)], fused=fused).double(),
                                   torch.sqrt(want ** 2 + 2), rtol=1e-6, atol=1e-6)
        assert view.numel() == t.numel() and view.is_contiguous()
        torch.testing.assert_close(torch.sqrt((view.double() ** 2).sum()), want, rtol=1e-12, atol=0)
    for t in dense[:4]:  # the same memory, not a copy
        assert memory_order([t])[0].untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    for t in gapped:
        assert memory_order([t])[0].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_bad_inputs_give_clear_errors():
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on meta"):
        ops.global_norm([torch.zeros(3), torch.zeros(3, device="meta")])
    with pytest.raises(TypeError, match=r"tensors\[0\] has dtype torch.int64"):
        ops.rademacher_([torch.zeros(3, dtype=torch.long)], 0, 0)
    with pytest.raises(TypeError, match="list of tensors"):
        ops.global_norm(torch.zeros(3))
    with pytest.raises(RuntimeError, match="sparse"):
        ops.global_norm([torch.zeros(3).to_sparse()])


@requires_fused
def test_cpp_ops_validate_inputs():
    with pytest.raises(RuntimeError, match="not contiguous"):
        torch.ops.natasha.global_norm([torch.zeros(4, 4).t()])
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.natasha.global_norm([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match="(?i)sparse"):  # refused by the dispatcher, no crash
        torch.ops.natasha.rademacher_([torch.zeros(4).to_sparse()], seed=0, offset=0)


@requires_fused
def test_fused_true_with_reference_backend_is_an_error():
    code = ("import torch, natasha_ext\nfrom natasha_ext import ops\n"
            "assert not ops.fused_available()\n"
            "try:\n    ops.global_norm([torch.ones(3)], fused=True)\nexcept RuntimeError as e:\n"
            "    assert 'reference' in str(e); print('OK')\n")
    env = dict(os.environ, NATASHA_EXT_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_package_runs_on_reference_path_without_compiled_library():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import natasha_ext\n"
            "from natasha_ext import ops\n"
            "assert not ops.fused_available()\n"
            "msgs = [str(x.message) for x in w if 'reference path' in str(x.message)]\n"
            "assert len(msgs) == 1, msgs\n"
            "t = [torch.empty(300)]; ops.rademacher_(t, 1, 2)\n"
            "assert abs(float(ops.global_norm(t)) - 300 ** 0.5) < 1e-4\n"
            "try:\n    ops.global_norm(t, fused=True)\nexcept RuntimeError as e:\n    print('OK', e)\n")
    env = dict(os.environ, NATASHA_EXT_LIBRARY="/nonexistent/_C.so")
    env.pop("NATASHA_EXT_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
    assert "not available" in out.stdout


@requires_fused
def test_torch_compile_fullgraph_traces_the_ops():
    def f(xs):
        ops.rademacher_(xs, 7, 0)
        return ops.global_norm(xs) * 2

    xs = [torch.empty(100), torch.empty(3, 7)]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(xs)
    ys = [torch.empty(100), torch.empty(3, 7)]
    want = f(ys)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(a, b) for a, b in zip(xs, ys))


def test_global_norm_mixed_dtypes_matches_reference():
    """A mixed fp16/fp32/fp64 list accumulates in the first tensor's accumulation dtype (fp64 when
    it is fp64, else fp32), reading every member in its own dtype, like the reference."""
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(1000, generator=g).half(), torch.randn(70000, generator=g),
          torch.randn(33, generator=g).double()]
    for order, acc in ((ts, torch.float32), (ts[::-1], torch.float64)):
        fused = ops.global_norm(order, fused=ops.fused_available() or None)
        ref = ops.global_norm(order, fused=False)
        assert fused.dtype == ref.dtype == acc
        torch.testing.assert_close(fused, ref, rtol=1e-12 if acc == torch.float64 else 1e-5, atol=0)
