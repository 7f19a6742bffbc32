"""hutchinson_diag_ and adahessian_step: reference semantics, spatial averaging, fused vs reference."""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.curvature import spatial_average
from natasha_ext.ops import adahessian as aops
from natasha_ext.ops import reference
from tests import helpers
from tests.helpers import CUDA, devices, elementwise_tol

HAVE_KERNELS = ops.fused_available()
requires_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="adahessian kernels not built")


# ------------------------------------------------------------------ spatial averaging, 1-D .. 5-D
@pytest.mark.parametrize("shape", [(7,), (5, 6), (4, 3, 5), (4, 3, 3, 3), (2, 3, 2, 3, 4), (2, 2, 2, 1, 3, 2)])
def test_spatial_average_shapes(shape):
    d = torch.randn(shape, dtype=torch.float64)
    got = spatial_average(d, abs_first=True)
    if len(shape) <= 2:
        want = d.abs()
    else:  # mean of |D| over every kernel dim, the same value for the whole kernel
        want = d.abs().mean(dim=tuple(range(2, len(shape))), keepdim=True).expand(shape)
    torch.testing.assert_close(got, want)
    # the default: eq. 9's mean of the signed D
    got2 = spatial_average(d)
    want2 = d if len(shape) <= 2 else d.mean(dim=tuple(range(2, len(shape))), keepdim=True).expand(shape)
    torch.testing.assert_close(got2, want2)


@pytest.mark.parametrize("shape,b", [((10,), 3), ((4, 5), 4), ((6,), 6), ((5,), 8)])
def test_block_average_eq9(shape, b):
    d = torch.randn(shape, dtype=torch.float64)
    flat = d.abs().reshape(-1)
    want = torch.empty_like(flat)
    for i in range(0, flat.numel(), b):  # eq. 9; the last block averages the elements it has
        want[i:i + b] = flat[i:i + b].mean()
    torch.testing.assert_close(spatial_average(d, block_size=b, abs_first=True), want.view(shape))
    # conv kernels ignore block_size
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(spatial_average(w, block_size=b), spatial_average(w))


def test_group_sizes():
    assert aops.spatial_group_size((64,)) == 1
    assert aops.spatial_group_size((10, 512), block_size=32) == 32
    assert aops.spatial_group_size((64, 3, 7)) == 7
    assert aops.spatial_group_size((64, 3, 7, 7), block_size=32) == 49
    assert aops.spatial_group_size((8, 4, 3, 3, 3)) == 27
    assert aops.spatial_group_size(()) == 1


# ------------------------------------------------------------------ hutchinson_diag_ semantics
def test_hutchinson_diag_reference_uses_the_stream_draw():
    shapes = [(3, 4), (0,), (130,), (2, 1, 3, 3)]
    hz = [torch.randn(s) for s in shapes]
    z = [torch.empty(s) for s in shapes]
    ops.rademacher_(z, 77, 5, fused=False)
    out = [torch.full(s, 2.0) for s in shapes]
    reference.hutchinson_diag_(out, hz, 77, 5, 0.5, False)
    for o, zi, h in zip(out, z, hz):
        torch.testing.assert_close(o, 0.5 * zi * h, rtol=0, atol=0)
    reference.hutchinson_diag_(out, hz, 77, 5, 0.5, True)
    for o, zi, h in zip(out, z, hz):
        torch.testing.assert_close(o, zi * h)


def test_adahessian_step_reference_one_tensor():
    torch.manual_seed(1)
    p = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    g, hz = torch.randn_like(p), torch.randn_like(p)
    m, v = torch.randn_like(p), torch.rand_like(p)
    p0, m0, v0 = p.clone(), m.clone(), v.clone()
    lr, b1, b2, eps, wd, k, bc1, bc2 = 0.1, 0.9, 0.99, 1e-3, 0.01, 0.5, 0.3, 0.05
    reference.adahessian_step([p], [g], [m], [v], [hz], [4], 1, True, 3, 0, lr, b1, b2, eps, wd, k, bc1, bc2)
    ds = hz.abs().mean(dim=(2, 3), keepdim=True).expand_as(hz)
    m1 = b1 * m0 + (1 - b1) * g
    v1 = b2 * v0 + (1 - b2) * ds * ds
    p1 = p0 - lr * (m1 / bc1 / ((v1 / bc2).sqrt() ** k + eps) + wd * p0)
    torch.testing.assert_close(m, m1)
    torch.testing.assert_close(v, v1)
    torch.testing.assert_close(p, p1)


# ------------------------------------------------------------------ fused vs reference
SIZES = [(n,) for n in helpers.SIZES] + [(8, 3, 3, 3), (16, 8, 3), (4, 2, 3, 3, 3), (33, 7)]


def _lists(shapes, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, scale=1.0: (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    sdt = aops.state_dtype(dtype)
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    hz = [mk(s) for s in shapes]
    m = [mk(s, 0.1).to(sdt) for s in shapes]
    v = [mk(s).abs().to(sdt) for s in shapes]
    d = [mk(s).to(sdt) for s in shapes]
    return params, grads, hz, m, v, d


def _clone(ts):
    return [t.clone() for t in ts]


@requires_kernels
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True])
def test_hutchinson_fused_vs_reference(device, dtype, accumulate):
    shapes = SIZES + [(3,)] * 115  # > 110 tensors
    _, _, hz, _, _, d = _lists(shapes, device, dtype)
    a, b = _clone(d), _clone(d)
    ops.hutchinson_diag_(a, hz, 1234567, 9, alpha=0.25, accumulate=accumulate, fused=True)
    reference.hutchinson_diag_(b, hz, 1234567, 9, 0.25, accumulate)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **elementwise_tol(dtype))


@requires_kernels
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,abs_first,block,k", [(1, True, None, 1.0), (1, False, None, 0.5), (2, True, 5, 1.0),
                                                    (2, False, 3, 0.7), (0, True, None, 1.0), (1, False, 128, 1.0)])
def test_adahessian_step_fused_vs_reference(device, dtype, mode, abs_first, block, k):
    shapes = SIZES + ([(5, 3)] * 112 if mode == 1 else [])
    params, grads, hz, m, v, d = _lists(shapes, device, dtype)
    curv = hz if mode == 1 else d if mode == 2 else []
    gs = [aops.spatial_group_size(s, block) for s in shapes]
    kw = dict(curv_mode=mode, abs_first=abs_first, seed=2**40 + 3, offset=17, lr=0.05, beta1=0.9, beta2=0.999,
              eps=1e-4, weight_decay=0.01, hessian_power=k, bias_correction1=1 - 0.9 ** 3,
              bias_correction2=1 - 0.999 ** 2)
    _assert_step_fused_matches_reference(params, grads, m, v, curv, gs, dtype, **kw)


def _assert_step_fused_matches_reference(params, grads, m, v, curv, gs, dtype, **kw):
    """adahessian_step on copies of (params, m, v), fused and reference: every output list agrees."""
    P, M, Vv = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(P, grads, M, Vv, curv, gs, fused=True, **kw)
    Pr, Mr, Vr = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(Pr, grads, Mr, Vr, curv, gs, fused=False, **kw)
    for a, b in zip(P + M + Vv, Pr + Mr + Vr):
        torch.testing.assert_close(a, b, **elementwise_tol(dtype))


@requires_kernels
@pytest.mark.parametrize("device", devices())
def test_adahessian_step_noncontiguous(device):
    base = torch.randn(6, 4, 3, 3, device=device)
    p = base.transpose(0, 1)  # non-contiguous param and state
    g, hz = torch.randn_like(p), torch.randn_like(p)
    m, v = torch.zeros(4, 6, 3, 3, device=device).transpose(0, 1) * 0, torch.rand(6, 4, 3, 3, device=device).transpose(0, 1)
    kw = dict(curv_mode=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-4, bias_correction1=0.1, bias_correction2=0.001)
    P, M, Vv = p.clone(), m.clone(), v.clone()
    ops.adahessian_step([p], [g], [m], [v], [hz], [9], fused=True, **kw)
    ops.adahessian_step([P], [g], [M], [Vv], [hz], [9], fused=False, **kw)
    # the kernel sees contiguous copies: the groups follow the contiguous (logical) layout
    for a, b in ((p, P), (m, M), (v, Vv)):
        torch.testing.assert_close(a, b)


def _strided_views(seed):
    """Read-only inputs in the layouts autograd hands back: the double backward's transposed conv
    weights (runs of kh * kw; the kernel reads them tile by tile, whole rows for the first, part
    rows for the second and the last), channels_last, a permutation whose innermost dim is strided, a
    gapped slice, an expanded row, a size-1 dim with any stride; the large ones cross chunk
    boundaries mid-run (16384 and 16380 are not multiples of 9 * 31)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return [r(31, 256, 3, 3).transpose(0, 1), r(600, 20, 3, 3).transpose(0, 1),
            r(6, 5, 3, 3).contiguous(memory_format=torch.channels_last),
            r(3, 5, 6, 4).permute(2, 1, 3, 0), r(10, 18)[:, ::2], r(7).expand(3, 7),
            r(4, 2, 7).as_strided((4, 1, 7), (14, 99, 2)), r(40000, 2).t()]


@requires_kernels
@pytest.mark.parametrize("mode,abs_first", [(1, False), (1, True), (2, False)])
def test_adahessian_step_reads_strided_grads_and_curvature(mode, abs_first):
    """The CPU kernel reads strided grads / curv chunk by chunk (no whole copy beforehand): the
    same values as the reference on the contiguous equivalents, groups following the logical
    layout."""
    views = _strided_views(1)
    assert not any(t.is_contiguous() for t in views)
    shapes = [t.shape for t in views]
    params, _, _, m, v, _ = _lists(shapes, "cpu", torch.float32, seed=2)
    grads = [t * 0.5 for t in _strided_views(3)]  # strided too (elementwise ops keep the layout)
    curv = views if mode == 1 else [t.abs() for t in views]
    assert not any(t.is_contiguous() for t in grads[:3] + curv[:3])
    gs = [aops.spatial_group_size(s, 5) for s in shapes]
    kw = dict(curv_mode=mode, abs_first=abs_first, seed=7, offset=11, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-4,
              weight_decay=0.01, hessian_power=1.0, bias_correction1=0.1, bias_correction2=0.001)
    P, M, Vv = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(P, grads, M, Vv, curv, gs, fused=True, **kw)
    Pr, Mr, Vr = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(Pr, [t.contiguous() for t in grads], Mr, Vr, [t.contiguous() for t in curv], gs, fused=False,
                        **kw)
    for a, b in zip(P + M + Vv, Pr + Mr + Vr):
        torch.testing.assert_close(a, b)


@requires_kernels
@pytest.mark.parametrize("accumulate", [False, True])
def test_hutchinson_reads_strided_hz(accumulate):
    hz = _strided_views(4)
    d = [torch.randn(t.shape) for t in hz]
    a, b = _clone(d), _clone(d)
    ops.hutchinson_diag_(a, hz, 99, 3, alpha=0.5, accumulate=accumulate, fused=True)
    reference.hutchinson_diag_(b, [t.contiguous() for t in hz], 99, 3, 0.5, accumulate)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_readable_copies_only_off_cpu():
    """readable() is the Python half of check_read_list: strided CPU inputs go to the kernel as they are."""
    from natasha_ext.ops._dispatch import readable

    t = torch.randn(4, 6).t()
    (same,) = readable([t])
    assert same is t
    if CUDA:
        (c,) = readable([t.cuda()])
        assert c.is_contiguous()


@pytest.mark.skipif(not (CUDA and HAVE_KERNELS and ops.fused_available("cuda")), reason="needs CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adahessian_step_cuda_half(dtype):
    shapes = SIZES
    params, grads, hz, m, v, d = _lists(shapes, "cuda", dtype)
    gs = [aops.spatial_group_size(s) for s in shapes]
    kw = dict(curv_mode=1, abs_first=True, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-4, bias_correction1=0.271,
              bias_correction2=0.002)
    _assert_step_fused_matches_reference(params, grads, m, v, hz, gs, dtype, **kw)


@pytest.mark.skipif(not (CUDA and HAVE_KERNELS and ops.fused_available("cuda")), reason="needs CUDA kernels")
def test_hutchinson_cpu_cuda_bit_identical_probe():
    hz = [torch.randn(s) for s in [(4097,), (3, 3, 3, 3)]]
    a = ops.hutchinson_diag(hz, 99, 4, fused=True)
    b = ops.hutchinson_diag([h.cuda() for h in hz], 99, 4, fused=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y.cpu())



# Groups that straddle the 65536-element chunks of the CUDA multi-tensor apply (each block
# recomputes the mean of a group reaching outside its chunk), the warp-per-group path (G >= 32)
# and the thread-per-group path (G < 32); the CPU kernel cuts chunks at group boundaries.
STRADDLE = [(256, 31, 3, 3), (70001,), (3, 40000), (2, 3, 7, 7), (4, 2, 3, 3, 3), (130, 1000, 1, 1)]


@requires_kernels
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode,abs_first,block", [(1, True, 100), (1, False, 100), (2, False, 37), (1, False, 7)])
def test_adahessian_step_groups_straddling_chunks(device, mode, abs_first, block):
    params, grads, hz, m, v, d = _lists(STRADDLE, device, torch.float32, seed=3)
    curv = hz if mode == 1 else d
    gs = [aops.spatial_group_size(s, block) for s in STRADDLE]
    kw = dict(curv_mode=mode, abs_first=abs_first, seed=5, offset=3, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-4,
              weight_decay=0.0, hessian_power=1.0, bias_correction1=0.1, bias_correction2=0.001)
    P, M, Vv = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(P, grads, M, Vv, curv, gs, fused=True, **kw)
    Pr, Mr, Vr = _clone(params), _clone(m), _clone(v)
    ops.adahessian_step(Pr, grads, Mr, Vr, curv, gs, fused=False, **kw)
    for a, b in zip(P + M + Vv, Pr + Mr + Vr):
        torch.testing.assert_close(a, b, **elementwise_tol(torch.float32))


@pytest.mark.skipif(not (CUDA and HAVE_KERNELS and ops.fused_available("cuda")), reason="needs CUDA kernels")
@pytest.mark.parametrize("mode,abs_first", [(1, False), (2, True), (0, True)])
def test_adahessian_step_cuda_matches_cpu_kernel(mode, abs_first):
    """The CUDA and CPU kernels agree (same Philox probe, same group means) on one list."""
    shapes = SIZES + STRADDLE
    params, grads, hz, m, v, d = _lists(shapes, "cpu", torch.float64, seed=4)
    curv = hz if mode == 1 else d if mode == 2 else []
    gs = [aops.spatial_group_size(s, 50) for s in shapes]
    kw = dict(curv_mode=mode, abs_first=abs_first, seed=77, offset=1, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-4,
              weight_decay=0.01, hessian_power=0.5, bias_correction1=0.19, bias_correction2=0.0199)
    cu = lambda ts: [t.cuda() for t in ts]
    P, M, Vv = cu(params), cu(m), cu(v)
    ops.adahessian_step(P, cu(grads), M, Vv, cu(curv), gs, fused=True, **kw)
    ops.adahessian_step(params, grads, m, v, curv, gs, fused=True, **kw)
    for a, b in zip(P + M + Vv, params + m + v):
        torch.testing.assert_close(a.cpu(), b, **elementwise_tol(torch.float64))


def test_invalid_arguments():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="curv_mode"):
        ops.adahessian_step(p, p, p, p, p, [1], curv_mode=3, lr=1, beta1=0.9, beta2=0.9, eps=1,
                            bias_correction1=1, bias_correction2=1)
    with pytest.raises(ValueError, match="grads"):
        ops.adahessian_step(p, [torch.zeros(4)], p, p, p, [1], curv_mode=1, lr=1, beta1=0.9, beta2=0.9, eps=1,
                            bias_correction1=1, bias_correction2=1)
    with pytest.raises(ValueError, match="diag"):
        ops.hutchinson_diag_([torch.zeros(2)], p, 0, 0)
