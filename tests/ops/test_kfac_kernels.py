"""Fused K-FAC / SMW / ANG kernels against the reference on the shapes that stress the
multi-tensor machinery: many layers (several launches, > 256 layers for the per-layer sums),
layers larger than one chunk (65536 elements), empty layers; fp16/bf16 and the no-host-sync
contract on CUDA; whole optimizer steps fused vs reference on every device."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext import ops
from natasha_ext.optim import ANG, IFANG, KFAC
from natasha_ext.precision import accumulation_dtype
from tests.helpers import devices, dtypes, matmul_tol, requires_cuda, requires_fused

# (out, in): a 300-layer list (> 256: two batches of per-layer sums) with a few big/empty layers
_MANY = [(3, 5), (1, 1), (0, 4), (260, 257), (2, 70000 // 2)] + [(4, 3 + (j % 5)) for j in range(295)]


def _lists(shapes, dtype, device, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]
    acc = accumulation_dtype(dtype)
    ya = [(0.5 * torch.randn(rank, s[1], generator=g, dtype=torch.float64)).to(device, acc) for s in shapes]
    yg = [(0.5 * torch.randn(rank, s[0], generator=g, dtype=torch.float64)).to(device, acc) for s in shapes]
    return T, ya, yg


def _close_scaled(a, b, dtype):
    if b.numel() == 0:
        assert a.numel() == 0
        return
    s = b.abs().max().clamp_min(1)
    torch.testing.assert_close(a.float() / s if dtype != torch.float64 else a / s,
                               b.float() / s if dtype != torch.float64 else b / s, **matmul_tol(dtype))


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rank", [1, 3])
def test_smw_many_layers_and_big_layers(device, rank):
    for dtype in dtypes(device, cpu_low=[]):
        T, ya, yg = _lists(_MANY, dtype, device, rank)
        lams = [0.05 + 0.01 * (j % 7) for j in range(len(T))]
        uf, rf = ops.kfac_smw_apply(T, ya, yg, lams, fused=True)
        ur, rr = ops.kfac_smw_apply(T, ya, yg, lams, fused=False)
        for a, b in zip(uf, ur):
            assert a.dtype == b.dtype and a.shape == b.shape
            _close_scaled(a, b, dtype)
        assert rf.shape == (len(T), 3) and rf.dtype == rr.dtype
        torch.testing.assert_close(rf / rr.abs().clamp_min(1), rr / rr.abs().clamp_min(1), **matmul_tol(dtype))


@requires_fused
@pytest.mark.parametrize("device", devices())
def test_precondition_many_layers(device):
    for dtype in dtypes(device, cpu_low=[]):
        shapes = [(3, 5), (1, 1), (0, 4), (300, 260)] + [(3, 4)] * 120  # > 1 chunk; > 96 tensors per launch
        T, _, _ = _lists(shapes, dtype, device, 1)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        gi = [torch.eye(s[0], dtype=acc, device=device) * 0.5 + 0.01 for s in shapes]
        ai = [torch.eye(s[1], dtype=acc, device=device) * 2.0 for s in shapes]
        uf, rf = ops.kfac_precondition(T, gi, ai, fused=True)
        ur, rr = ops.kfac_precondition(T, gi, ai, fused=False)
        for a, b in zip(uf, ur):
            _close_scaled(a, b, dtype)
        torch.testing.assert_close(rf / rr.abs().clamp_min(1), rr / rr.abs().clamp_min(1), **matmul_tol(dtype))


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("per_layer", [False, True])
def test_ang_combine_many_layers(device, per_layer):
    for dtype in dtypes(device, cpu_low=[]):
        T, _, _ = _lists(_MANY, dtype, device, 1, seed=1)
        U = [(0.3 * t.double() + torch.randn(t.shape, dtype=torch.float64).to(device)).to(dtype) for t in T]
        U[7] = -2 * T[7]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        red = torch.stack([torch.stack([(t.to(acc) * u.to(acc)).sum(), u.to(acc).square().sum(),
                                        t.to(acc).square().sum()]) for t, u in zip(T, U)])
        scale = torch.tensor(0.8, dtype=acc, device=device)
        for lam in (0.0, 0.6, 1.0):
            a, b = [u.clone() for u in U], [u.clone() for u in U]
            ca = ops.ang_combine_(a, T, red, scale, lam, per_layer, fused=True)
            cb = ops.ang_combine_(b, T, red, scale, lam, per_layer, fused=False)
            torch.testing.assert_close(ca, cb, **matmul_tol(acc))
            for x, y in zip(a, b):
                _close_scaled(x, y, dtype)


@requires_fused
@pytest.mark.parametrize("device", devices())
def test_factor_ema_fp32_factors_from_low_precision_rows(device):
    rows = [torch.randn(33, n, device=device) for n in (1, 7, 130)]
    for rdt in ([torch.float32] + ([torch.float16, torch.bfloat16] if device == "cuda" else [torch.bfloat16])):
        for decay in (0.0, 0.95):
            f1 = [torch.full((r.shape[1], r.shape[1]), float("nan") if decay == 0 else 0.3, device=device) for r in rows]
            f2 = [f.clone() for f in f1]
            ops.kfac_factor_ema_(f1, [r.to(rdt) for r in rows], [1 / 33] * 3, decay, fused=True)
            ops.kfac_factor_ema_(f2, [r.to(rdt) for r in rows], [1 / 33] * 3, decay, fused=False)
            for a, b in zip(f1, f2):
                assert a.dtype == torch.float32 and torch.isfinite(a).all()  # decay 0 ignores the NaN
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _net(device, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.Tanh(), nn.Linear(5, 3)).to(device, dtype)


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("make", [
    lambda m, f: KFAC(m, lr=0.05, damping=1e-2, cov_every=1, inv_every=2, fused=f),
    lambda m, f: ANG(m, lr=0.05, damping=1e-2, cov_every=1, inv_every=2, total_steps=6, per_layer=True, fused=f),
    lambda m, f: IFANG(m, lr=0.05, damping=1e-2, rank=2, total_steps=6, lam_schedule="exp", fused=f),
], ids=["kfac", "ang", "ifang"])
def test_optimizer_fused_equals_reference(device, make):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 2, 6, 6, generator=g).to(device) for _ in range(4)]
    ys = [torch.randint(0, 3, (8,), generator=g).to(device) for _ in range(4)]
    finals = []
    for fused in (True, False):
        m = _net(device)
        opt = make(m, fused)
        assert opt.fused is fused
        for x, y in zip(xs, ys):
            opt.step(lambda: F.cross_entropy(m(x), y))
        finals.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


@requires_cuda
@requires_fused
def test_cuda_ops_do_not_sync_with_the_host():
    """torch.cuda sync debug mode turns any host synchronisation inside the ops into an error."""
    T, ya, yg = _lists([(30, 41), (5, 7), (0, 3)], torch.float32, "cuda", 2)
    gi = [torch.eye(t.shape[0], device="cuda") for t in T]
    ai = [torch.eye(t.shape[1], device="cuda") for t in T]
    rows = [torch.randn(9, t.shape[1], device="cuda") for t in T]
    fa = [torch.zeros(t.shape[1], t.shape[1], device="cuda") for t in T]
    scale = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.kfac_factor_ema_(fa, rows, [0.1, 0.1, 0.1], 0.9, fused=True)
        u, red = ops.kfac_smw_apply(T, ya, yg, [0.1, 0.2, 0.3], fused=True)
        u2, red2 = ops.kfac_precondition(T, gi, ai, fused=True)
        ops.ang_combine_(u, T, red, scale, 0.4, False, fused=True)
        ops.ang_combine_(u2, T, red2, scale, 0.4, True, fused=True)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()
    assert all(torch.isfinite(x).all() for x in u + u2)
