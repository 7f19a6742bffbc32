"""K-FAC / ANG / IFANG math against dense linear algebra (fp64), and fused vs reference ops."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext import ops
from natasha_ext.ops import reference
from natasha_ext.optim import ANG, IFANG, KFAC
from tests.helpers import devices, matmul_tol, requires_cuda, requires_fused


def _spd(n, dtype=torch.float64, gen=None):
    x = torch.randn(n, 2 * n + 3, dtype=dtype, generator=gen)
    return x @ x.t() / x.shape[1]


def _row_kron_solve(G, A, T):
    """Dense ((A) (x) (G))^-1 vec(T) with row-major vec: vec_r(G X A) = (G kron A) vec_r(X)."""
    K = torch.kron(G, A)
    return torch.linalg.solve(K, T.reshape(-1)).reshape(T.shape)


def test_precondition_equals_dense_damped_kronecker_inverse():
    A, G = _spd(7), _spd(5)
    lam = 0.05
    T = torch.randn(5, 7, dtype=torch.float64)
    Ad, Gd = A + lam * torch.eye(7, dtype=A.dtype), G + lam * torch.eye(5, dtype=A.dtype)
    (U,), red = ops.kfac_precondition([T], [torch.linalg.inv(Gd)], [torch.linalg.inv(Ad)], fused=False)
    dense = _row_kron_solve(Gd, Ad, T)
    torch.testing.assert_close(U, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(red[0], torch.stack([(T * dense).sum(), dense.square().sum(), T.square().sum()]))


def _spy(m, acts, gouts):
    """Record layer inputs and output gradients of m[0] and m[2] independently of the optimizer."""
    def make(k):
        def hook(mod, inputs, out):
            acts[k] = inputs[0].detach()
            out.register_hook(lambda g: gouts.__setitem__(k, g))
        return hook
    return [m[k].register_forward_hook(make(k)) for k in (0, 2)]


def _mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def test_kfac_step_is_dense_damped_kronecker_inverse_of_hooked_factors():
    """Whole pipeline: hooks -> factors -> inverses -> step equals the dense solve with the
    factors recomputed here from their definition (A = E[aa^T] with bias column, G = B E[go go^T])."""
    torch.manual_seed(1)
    m = _mlp()
    lam, lr = 0.1, 0.5
    opt = KFAC(m, lr=lr, momentum=0.0, damping=lam ** 2, kl_clip=None, cov_every=1, inv_every=1, fisher="empirical")  # sqrt per factor
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    acts, gouts = {}, {}
    hs = _spy(m, acts, gouts)
    out = m(x)
    loss = F.mse_loss(out, y)
    loss.backward()
    for h in hs:
        h.remove()
    before = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    B = x.shape[0]
    for li, k in enumerate((0, 2)):
        a = torch.cat([acts[k], torch.ones(B, 1, dtype=x.dtype)], 1)
        A = a.t() @ a / B
        G = B * gouts[k].t() @ gouts[k]
        T = torch.cat([grads[2 * li], grads[2 * li + 1][:, None]], 1)
        n, o = A.shape[0], G.shape[0]
        U = _row_kron_solve(G + lam * torch.eye(o, dtype=x.dtype), A + lam * torch.eye(n, dtype=x.dtype), T)
        st = opt.state[m[k].weight]
        torch.testing.assert_close(st["kfac_A"], A)
        torch.testing.assert_close(st["kfac_G"], G)
        dw = (before[2 * li] - m[k].weight.detach()) / lr
        db = (before[2 * li + 1] - m[k].bias.detach()) / lr
        torch.testing.assert_close(torch.cat([dw, db[:, None]], 1), U, rtol=1e-8, atol=1e-10)


def test_single_sample_kronecker_factors_equal_dense_empirical_fisher():
    """One example per batch: vec(g a^T) vec(g a^T)^T = (g g^T) (x) (a a^T) exactly."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(4, 3)).double()
    opt = KFAC(m, lr=0.0, damping=1e-3, cov_every=1, fisher="empirical")
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    out = m(x)  # one forward: one sample
    loss = 0.5 * (out - y).square().sum() + (out ** 3).sum()
    loss.backward()
    T = torch.cat([m[0].weight.grad, m[0].bias.grad[:, None]], 1).reshape(-1)
    fisher = torch.outer(T, T)
    opt.step()
    st = opt.state[m[0].weight]
    torch.testing.assert_close(torch.kron(st["kfac_G"], st["kfac_A"]), fisher, rtol=1e-12, atol=1e-12)


def test_conv_factors_follow_their_definition():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    m = nn.Sequential(conv)
    opt = KFAC(m, lr=0.0, cov_every=1, fisher="empirical")
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    gout = {}
    def hook(mod, inputs, out):
        out.register_hook(lambda g: gout.__setitem__(0, g))
    h = conv.register_forward_hook(hook)
    m(x).square().mean().backward()
    h.remove()
    opt.step()
    cols = F.unfold(x, 3, padding=1, stride=2)  # [B, 18, L]
    B, L = cols.shape[0], cols.shape[2]
    a = torch.cat([cols.transpose(1, 2).reshape(-1, 18), torch.ones(B * L, 1, dtype=x.dtype)], 1)
    g = gout[0].permute(0, 2, 3, 1).reshape(-1, 3) * B  # per-example gradients
    st = opt.state[conv.weight]
    torch.testing.assert_close(st["kfac_A"], a.t() @ a / (B * L))
    torch.testing.assert_close(st["kfac_G"], L * (g.t() @ g) / (B * L))


@pytest.mark.parametrize("rank", [1, 2, 8])
@pytest.mark.parametrize("lam", [1e-1, 1e-3])
def test_smw_equals_dense_inverse_fp64(rank, lam):
    g = torch.Generator().manual_seed(rank)
    T = torch.randn(30, 41, dtype=torch.float64, generator=g)
    ya = torch.randn(rank, 41, dtype=torch.float64, generator=g)
    yg = torch.randn(rank, 30, dtype=torch.float64, generator=g)
    (U,), red = ops.kfac_smw_apply([T], [ya], [yg], lam, fused=False)
    Ginv = torch.linalg.inv(lam * torch.eye(30, dtype=T.dtype) + yg.t() @ yg)
    Ainv = torch.linalg.inv(lam * torch.eye(41, dtype=T.dtype) + ya.t() @ ya)
    dense = Ginv @ T @ Ainv
    err = (U - dense).abs().max() / dense.abs().max()
    assert err < 1e-10, float(err)
    torch.testing.assert_close(red[0], torch.stack([(T * dense).sum(), dense.square().sum(), T.square().sum()]),
                               rtol=1e-9, atol=0)


def _dense_slerp(U, T, lam):
    nu, nt = U.norm(), T.norm()
    dot = (U * T).sum()
    if dot <= 0:
        return T.clone()
    om = torch.arccos((dot / (nu * nt)).clamp(-1, 1))
    return nu * (torch.sin((1 - lam) * om) / torch.sin(om) * U / nu + torch.sin(lam * om) / torch.sin(om) * T / nt)


def test_ang_limits_unit_norm_fallback_and_parallel():
    g = torch.Generator().manual_seed(0)
    T = [torch.randn(4, 5, dtype=torch.float64, generator=g), torch.randn(3, 2, dtype=torch.float64, generator=g)]
    U = [t + 0.7 * torch.randn(t.shape, dtype=torch.float64, generator=g) for t in T]
    red = reference._kfac_reductions(T, U, torch.float64, None)
    flatU, flatT = torch.cat([u.flatten() for u in U]), torch.cat([t.flatten() for t in T])
    for lam in (0.0, 0.25, 0.5, 0.9, 1.0):
        nat = [u.clone() for u in U]
        ops.ang_combine_(nat, T, red, None, lam, False, fused=False)
        d = torch.cat([n.flatten() for n in nat])
        torch.testing.assert_close(d, _dense_slerp(flatU, flatT, lam), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d.norm(), flatU.norm())  # unit-norm blend times ||t||_G
        if lam == 0.0:
            torch.testing.assert_close(d, flatU, rtol=0, atol=0)  # exactly the natural gradient
        if lam == 1.0:
            torch.testing.assert_close(d, flatU.norm() * flatT / flatT.norm())
    # fallback: t^T G^-1 t <= 0 -> the plain gradient
    neg = [-u for u in U]
    nat = [u.clone() for u in neg]
    coef = ops.ang_combine_(nat, T, reference._kfac_reductions(T, neg, torch.float64, None), None, 0.3, False, fused=False)
    torch.testing.assert_close(torch.cat([n.flatten() for n in nat]), flatT, rtol=0, atol=0)
    assert coef[:, 0].eq(0).all() and coef[:, 1].eq(1).all()
    # parallel directions (Omega = 0): no NaN, the blend of two equal unit vectors
    par = [3.0 * t for t in T]
    for lam in (0.0, 0.4, 1.0):
        nat = [u.clone() for u in par]
        ops.ang_combine_(nat, T, reference._kfac_reductions(T, par, torch.float64, None), None, lam, True, fused=False)
        for n, p in zip(nat, par):
            assert torch.isfinite(n).all()
            torch.testing.assert_close(n, p)
    # zero gradient: no NaN
    z = [torch.zeros(2, 2, dtype=torch.float64)]
    nat = [torch.zeros(2, 2, dtype=torch.float64)]
    ops.ang_combine_(nat, z, reference._kfac_reductions(z, nat, torch.float64, None), None, 0.5, False, fused=False)
    assert torch.isfinite(nat[0]).all()


def test_ifang_direction_equals_dense_ang_with_low_rank_factors():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    lam, lr, blend = 0.05, 0.1, 0.3
    opt = IFANG(m, lr=lr, momentum=0.0, damping=lam ** 2, kl_clip=None, rank=2, lam_schedule=lambda s: blend, fisher="empirical")
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    acts, gouts = {}, {}
    hs = _spy(m, acts, gouts)
    F.mse_loss(m(x), y).backward()
    for h in hs:
        h.remove()
    before = [p.detach().clone() for p in m.parameters()]
    grads = [p.grad.clone() for p in m.parameters()]
    opt.step()
    Us, Ts = [], []
    B = 8
    for li, k in enumerate((0, 2)):
        a = torch.cat([acts[k], torch.ones(B, 1, dtype=x.dtype)], 1)
        ya = torch.stack([a[:4].mean(0), a[4:].mean(0)]) / math.sqrt(2)   # s' = 2 group means
        gper = gouts[k] * B
        yg = torch.stack([gper[:4].mean(0), gper[4:].mean(0)]) / math.sqrt(2)
        st = opt.state[m[k].weight]
        torch.testing.assert_close(st["kfac_YA"], ya)
        torch.testing.assert_close(st["kfac_YG"], yg)
        A, G = ya.t() @ ya, yg.t() @ yg  # dense low-rank factors
        T = torch.cat([grads[2 * li], grads[2 * li + 1][:, None]], 1)
        U = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=x.dtype)) @ T @ \
            torch.linalg.inv(A + lam * torch.eye(A.shape[0], dtype=x.dtype))
        Us.append(U)
        Ts.append(T)
    d = _dense_slerp(torch.cat([u.flatten() for u in Us]), torch.cat([t.flatten() for t in Ts]), blend)
    got = []
    for li, k in enumerate((0, 2)):
        dw = (before[2 * li] - m[k].weight.detach()) / lr
        db = (before[2 * li + 1] - m[k].bias.detach()) / lr
        got.append(torch.cat([dw, db[:, None]], 1).flatten())
    torch.testing.assert_close(torch.cat(got), d, rtol=1e-8, atol=1e-10)


def test_ang_lambda_zero_equals_kfac_and_one_is_euclidean_direction():
    def run(cls, **kw):
        torch.manual_seed(5)
        m = _mlp()
        opt = cls(m, lr=0.1, momentum=0.0, damping=0.1, kl_clip=None, cov_every=1, inv_every=1, **kw)
        torch.manual_seed(6)
        x, y = torch.randn(7, 6, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
        F.mse_loss(m(x), y).backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters()])
        before = torch.cat([p.detach().flatten() for p in m.parameters()])
        opt.step()
        return g, (before - torch.cat([p.detach().flatten() for p in m.parameters()])) / 0.1
    _, d_kfac = run(KFAC, fisher="empirical")  # ANG's default Fisher (Tang et al.'s eqs. 9-10)
    _, d0 = run(ANG, lam_schedule=lambda s: 0.0)
    g, d1 = run(ANG, lam_schedule=lambda s: 1.0)
    torch.testing.assert_close(d0, d_kfac, rtol=1e-12, atol=1e-12)
    cos = (d1 @ g) / (d1.norm() * g.norm())
    torch.testing.assert_close(cos, torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(d1.norm(), d_kfac.norm(), rtol=1e-10, atol=0)


# ------------------------------------------------------------------ fused vs reference
def _layers(dtype, device, rank=2, shapes=((1, 1), (22, 5), (130, 70), (3, 257))):
    g = torch.Generator().manual_seed(0)
    T = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in shapes]
    ya = [(torch.randn(rank, s[1], generator=g, dtype=dtype) * 0.5).to(device) for s in shapes]
    yg = [(torch.randn(rank, s[0], generator=g, dtype=dtype) * 0.5).to(device) for s in shapes]
    return T, ya, yg


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 2, 8])
def test_fused_smw_matches_reference(device, dtype, rank):
    T, ya, yg = _layers(dtype, device, rank)
    lams = [0.3, 0.05, 1e-2, 1.0]
    uf, rf = ops.kfac_smw_apply(T, ya, yg, lams, fused=True)
    ur, rr = ops.kfac_smw_apply(T, ya, yg, lams, fused=False)
    for a, b in zip(uf, ur):
        scale = b.abs().max().clamp_min(1)
        torch.testing.assert_close(a / scale, b / scale, **matmul_tol(dtype))
    torch.testing.assert_close(rf / rr.abs().clamp_min(1), rr / rr.abs().clamp_min(1), **matmul_tol(dtype))


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_precondition_and_ema_match_reference(device, dtype):
    T, _, _ = _layers(dtype, device)
    gi = [(_spd(t.shape[0], dtype) + torch.eye(t.shape[0], dtype=dtype)).to(device) for t in T]
    ai = [(_spd(t.shape[1], dtype) + torch.eye(t.shape[1], dtype=dtype)).to(device) for t in T]
    uf, rf = ops.kfac_precondition(T, gi, ai, fused=True)
    ur, rr = ops.kfac_precondition(T, gi, ai, fused=False)
    for a, b in zip(uf, ur):
        torch.testing.assert_close(a, b, **matmul_tol(dtype))
    torch.testing.assert_close(rf, rr, **matmul_tol(dtype))
    rows = [torch.randn(17, t.shape[1], dtype=dtype, device=device) for t in T]
    for decay in (0.0, 0.9):
        f1 = [a.clone() for a in ai]
        f2 = [a.clone() for a in ai]
        ops.kfac_factor_ema_(f1, rows, [0.1, 0.2, 0.3, 0.4], decay, fused=True)
        ops.kfac_factor_ema_(f2, rows, [0.1, 0.2, 0.3, 0.4], decay, fused=False)
        for a, b in zip(f1, f2):
            torch.testing.assert_close(a, b, **matmul_tol(dtype))
    if device == "cpu" and dtype == torch.float32:  # fp16 statistics (AMP) into fp32 factors
        f1 = [a.float().clone() for a in ai]
        f2 = [a.float().clone() for a in ai]
        r16 = [r.to(torch.bfloat16) for r in rows]
        ops.kfac_factor_ema_(f1, r16, [0.1] * 4, 0.5, fused=True)
        ops.kfac_factor_ema_(f2, r16, [0.1] * 4, 0.5, fused=False)
        for a, b in zip(f1, f2):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b)


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_layer", [False, True])
def test_fused_ang_combine_matches_reference(device, dtype, per_layer):
    T, _, _ = _layers(dtype, device, shapes=((1, 1), (22, 5), (130, 70), (300, 257), (0, 3)))
    U = [t * 0.5 + torch.randn_like(t) for t in T]
    U[1] = -3 * T[1]  # a layer with negative dot (per-layer fallback)
    red = reference._kfac_reductions(T, U, torch.float64 if dtype == torch.float64 else torch.float32, device)
    scale = torch.tensor(0.7, dtype=red.dtype, device=device)
    for lam in (0.0, 0.35, 1.0):
        a = [u.clone() for u in U]
        b = [u.clone() for u in U]
        ca = ops.ang_combine_(a, T, red, scale, lam, per_layer, fused=True)
        cb = ops.ang_combine_(b, T, red, scale, lam, per_layer, fused=False)
        torch.testing.assert_close(ca, cb, **matmul_tol(dtype))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **matmul_tol(dtype))


@requires_cuda
@requires_fused
def test_cuda_fp16_grads_smw():
    T, ya, yg = _layers(torch.float32, "cuda", 1)
    T16 = [t.half() for t in T]
    uf, rf = ops.kfac_smw_apply(T16, [y for y in ya], [y for y in yg], 0.1, fused=True)
    ur, rr = ops.kfac_smw_apply(T16, ya, yg, 0.1, fused=False)
    for a, b in zip(uf, ur):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
