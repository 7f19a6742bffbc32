"""Natasha1.5 / Natasha2 and Oja's algorithm on problems with known answers."""
import io
import math

import pytest
import torch

from natasha_ext import ops
from natasha_ext.curvature import HVP, oja_min_eigenvector
from natasha_ext.ops import PhiloxStream
from natasha_ext.optim import Natasha2, Natasha15
from tests.helpers import devices, requires_fused

D = torch.float64


# ------------------------------------------------------------------------------------- Oja
def _sym(eigs, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=D))
    return q @ torch.diag(torch.tensor(eigs, dtype=D)) @ q.T


SPECTRA = {
    "small": [-1.0, -0.2, 0.5, 1.0, 2.0],
    "indefinite_30": [-2.0] + [-1.0 + 3.0 * i / 28 for i in range(29)],
    "psd_100": [0.1] + [0.6 + 0.02 * i for i in range(99)],
    "near_degenerate_40": [-1.0, -0.999] + [0.5 + 0.05 * i for i in range(38)],
}


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_oja_finds_min_eigenpair(method, name):
    eigs = SPECTRA[name]
    a = _sym(eigs, seed=len(eigs))
    w, u = torch.linalg.eigh(a)
    x = torch.nn.Parameter(torch.randn(len(eigs), dtype=D))
    closure = lambda: 0.5 * x @ a @ x
    h = HVP(closure, [x], method=method, fd_eps=1e-6)
    eta = 1.0 / float(w.abs().max())
    gap = (1 - eta * float(w[1])) / (1 - eta * float(w[0]))
    degenerate = name.startswith("near")
    iters = 400 if degenerate else min(2000, int(math.log(1e-9) / math.log(gap)) + 1)
    res = oja_min_eigenvector(h, [x], eta=eta, iters=iters, rng=PhiloxStream(7))
    h.release()
    v = res.vector[0]
    assert res.hvps == iters + 1 and res.iterations == iters
    torch.testing.assert_close(v.norm(), torch.tensor(1.0, dtype=D))
    if degenerate:
        # lambda_1, lambda_2 differ by 1e-3: the eigenvalue is resolved, the vector lies in their span
        assert float(res.rayleigh) == pytest.approx(float(w[0]), abs=2e-3)
        outside = v - u[:, :2] @ (u[:, :2].T @ v)
        assert float(outside.norm()) < 1e-6
    else:
        assert float(res.rayleigh) == pytest.approx(float(w[0]), abs=1e-6)
        assert abs(float(v @ u[:, 0])) > 1 - 1e-6


# ---------------------------------------------------------------------------- the saddle
def _saddle():
    p = torch.nn.Parameter(torch.tensor([1.0, 0.0], dtype=D))
    f = lambda: 0.5 * p[0] ** 2 - 0.5 * p[1] ** 2 + 0.25 * p[1] ** 4
    return p, f


@pytest.mark.parametrize("variant", ["faithful", "simplified"])
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_natasha2_escapes_strict_saddle_sgd_does_not(hvp, variant):
    p, f = _saddle()
    # f is deterministic, so one minibatch gives the exact mu (snapshot_batches=1)
    opt = Natasha2([p], lr=0.1, sigma=0.1, epoch_size=8, subepochs=2, delta=0.5, eta=0.5, hvp=hvp,
                   variant=variant, snapshot_batches=1, seed=3)
    for _ in range(200):
        opt.step(f)
    assert abs(abs(float(p[1].detach())) - 1.0) < 1e-3, p
    assert abs(float(p[0].detach())) < 1e-3
    assert float(f().detach()) == pytest.approx(-0.25, abs=1e-5)
    assert opt.counters["kicks"] >= 1
    assert opt.counters["last_rayleigh"] > 0  # at the minimum the Hessian is diag(1, 2)
    # each Oja run: iters + 1 HVPs; each kick test on a fresh minibatch: one more
    # (oja_runs counts decided outer iterations; an Oja run awaiting its kick test is `pending`)
    pending = int(opt.position["outer"] > 0)
    assert opt.counters["kick_tests"] == opt.counters["oja_runs"] >= 1
    assert opt.counters["hvps"] == (opt.counters["oja_runs"] + pending) * (opt.oja_iterations() + 1) + opt.counters["kick_tests"]

    q, g = _saddle()
    sgd = torch.optim.SGD([q], lr=0.1)
    for _ in range(200):
        sgd.zero_grad()
        g().backward()
        sgd.step()
    assert float(q[1].detach()) == 0.0 and float(g().detach()) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------- Natasha1.5 problems
def _finite_sum_quadratic(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=D)
    a = m @ m.T / d + 0.5 * torch.eye(d, dtype=D)  # strongly convex, shared curvature
    b = torch.randn(n, d, generator=g, dtype=D) * 3.0  # per-sample linear terms: gradient noise
    xstar = torch.linalg.solve(a, b.mean(0))
    return a, b, xstar


def test_natasha15_faithful_converges_on_strongly_convex_quadratic():
    a, b, xstar = _finite_sum_quadratic()
    x = torch.nn.Parameter(torch.zeros(6, dtype=D))
    opt = Natasha15([x], lr=0.2, sigma=0.05, epoch_size=12, subepochs=3, snapshot_batches=len(b))
    i = 0
    for _ in range(600):
        bi = b[i % len(b)]
        i += 1
        opt.step(lambda: 0.5 * x @ a @ x - bi @ x)
    # mu is the full gradient (snapshot_batches = n): the variance-reduced method converges exactly
    assert float((x.detach() - xstar).norm()) < 1e-6
    assert opt.counters["epochs"] > 10


def test_natasha15_simplified_reaches_noise_ball_and_deterministic_optimum():
    a, b, xstar = _finite_sum_quadratic()
    x = torch.nn.Parameter(torch.zeros(6, dtype=D))
    opt = Natasha15([x], lr=0.2, sigma=0.5, epoch_size=6, subepochs=3, variance_reduction=False)
    bm = b.mean(0)
    for _ in range(400):
        opt.step(lambda: 0.5 * x @ a @ x - bm @ x)
    assert float((x.detach() - xstar).norm()) < 1e-8


def _net_and_data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 10, generator=g)
    w = torch.randn(10, 3, generator=g)
    ys = (xs @ w).argmax(1)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    return net, xs, ys


def _closure(net, xs, ys, j, bs=32):
    sl = slice((j * bs) % len(xs), (j * bs) % len(xs) + bs)
    return lambda: torch.nn.functional.cross_entropy(net(xs[sl]), ys[sl])


@pytest.mark.parametrize("vr", [True, False])
def test_natasha15_trains_small_net(vr):
    net, xs, ys = _net_and_data()
    full = lambda: float(torch.nn.functional.cross_entropy(net(xs), ys).detach())
    l0 = full()
    # mu over 4 minibatches: the cyclic loader below would otherwise always start epochs on batch 0
    opt = Natasha15(net.parameters(), lr=0.5, sigma=0.1, epoch_size=12, subepochs=4, variance_reduction=vr,
                    snapshot_batches=4 if vr else None)
    for j in range(240):
        opt.step(_closure(net, xs, ys, j))
    assert full() < 0.4 * l0


def test_faithful_estimator_variance_lower_than_sgd():
    net, xs, ys = _net_and_data(seed=1)
    nb = 8
    opt = Natasha15(net.parameters(), lr=0.05, sigma=0.0, epoch_size=20, subepochs=2, snapshot_batches=nb)
    for j in range(nb + 4):  # snapshot phase, then 4 inner steps: x != x_tilde, mid sub-epoch
        opt.step(_closure(net, xs, ys, j))
    params = list(net.parameters())
    st = [opt.state[p] for p in params]
    assert opt.position["in_epoch"] == 1 and opt.position["t"] > 0
    x = [p.detach().clone() for p in params]

    def grads_at(point, j):
        with torch.no_grad():
            for p, v in zip(params, point):
                p.copy_(v)
        loss = _closure(net, xs, ys, j)()
        return torch.autograd.grad(loss, params)

    est, sgd = [], []
    for j in range(nb):
        g = grads_at(x, j)
        gs = grads_at([s["snapshot"] for s in st], j)
        # the estimator through the op itself: lr = 1, reg = 0 -> x_new = x - d
        xp = [v.clone() for v in x]
        ops.svrg_step(xp, list(g), [v.clone() for v in x], [torch.zeros_like(v) for v in x], lr=1.0, reg=0.0,
                      snapshot_grads=list(gs), mu=[s["mu"] for s in st])
        est.append(torch.cat([(a - b).reshape(-1) for a, b in zip(x, xp)]))
        sgd.append(torch.cat([t.reshape(-1) for t in g]))
    est, sgd = torch.stack(est), torch.stack(sgd)
    var = lambda e: float(((e - e.mean(0)) ** 2).sum(1).mean())
    assert var(est) < 0.25 * var(sgd), (var(est), var(sgd))


# ------------------------------------------------------------- fused vs reference, resume
def _run_pair(make_opt, make_problem, steps, check_each=True):
    pa, fa = make_problem()
    pb, fb = make_problem()
    oa, ob = make_opt(pa, True), make_opt(pb, False)
    for k in range(steps):
        oa.step(fa(k))
        ob.step(fb(k))
        if check_each:
            for x, y in zip(pa, pb):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
    return oa, ob


def _mlp_problem(dtype=torch.float32):
    def make():
        net, xs, ys = _net_and_data(seed=2)
        net = net.to(dtype)
        xs = xs.to(dtype)
        return list(net.parameters()), lambda k: _closure(net, xs, ys, k)
    return make


@requires_fused
@pytest.mark.parametrize("vr", [True, False])
def test_natasha15_fused_matches_reference_step_by_step(vr):
    mk = lambda ps, fused: Natasha15(ps, lr=0.1, sigma=0.3, epoch_size=6, subepochs=2, variance_reduction=vr,
                                     fused=fused)
    oa, ob = _run_pair(mk, _mlp_problem(), 20)
    assert oa.fused and not ob.fused


@requires_fused
@pytest.mark.parametrize("variant", ["faithful", "simplified"])
def test_natasha2_fused_matches_reference_step_by_step(variant):
    def make():
        p = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.3, -0.2]))
        f = lambda: 0.5 * p[0] ** 2 - 0.5 * p[1] ** 2 + 0.25 * p[1] ** 4 + (p[2:] ** 2).sum() + p[0] * p[2]
        return [p], lambda k: f
    mk = lambda ps, fused: Natasha2(ps, lr=0.1, sigma=0.2, epoch_size=6, subepochs=2, delta=0.4, eta=0.3,
                                    L=5.0, variant=variant, fused=fused, seed=11)
    oa, ob = _run_pair(mk, make, 30)
    assert oa.counters["kicks"] == ob.counters["kicks"] >= 1


def _resume_check(make_opt, n_before, n_after):
    torch.manual_seed(0)
    net, xs, ys = _net_and_data(seed=3)
    opt = make_opt(net.parameters())
    for j in range(n_before):
        opt.step(_closure(net, xs, ys, j))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net2, _, _ = _net_and_data(seed=99)
    net2.load_state_dict(ck["model"])
    opt2 = make_opt(net2.parameters())
    opt2.load_state_dict(ck["opt"])
    assert opt2.position == opt.position
    for j in range(n_before, n_before + n_after):
        opt.step(_closure(net, xs, ys, j))
        opt2.step(_closure(net2, xs, ys, j))
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    assert opt.counters == opt2.counters or all(
        (a == b) or (a != a and b != b) for a, b in zip(opt.counters.values(), opt2.counters.values()))


def test_natasha15_state_dict_roundtrip_mid_epoch_bit_identical():
    # snapshot phase finished, mid sub-epoch: snapshot, mu, x_hat, running sum all live
    _resume_check(lambda ps: Natasha15(ps, lr=0.1, sigma=0.5, epoch_size=9, subepochs=3, snapshot_batches=2), 5, 14)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_natasha2_state_dict_roundtrip_bit_identical(hvp):
    # the Philox offset decides the next Oja start vector; the F^k centre is per-param state
    mk = lambda ps: Natasha2(ps, lr=0.1, sigma=0.5, epoch_size=6, subepochs=3, delta=0.3, eta=0.2, oja_iters=5,
                             hvp=hvp, seed=5)
    _resume_check(mk, 3, 9)


# ------------------------------------------------------------------ conformity, errors
def test_invalid_hyperparameters_name_the_argument():
    p = [torch.nn.Parameter(torch.zeros(2))]
    cases = [(dict(lr=-1.0), "lr"), (dict(sigma=-0.1), "sigma"), (dict(epoch_size=10, subepochs=3), "epoch_size"),
             (dict(epoch_size=9, subepochs=9), "m = 1"), (dict(snapshot_batches=0), "snapshot_batches")]
    for kw, word in cases:
        with pytest.raises(ValueError, match=word):
            Natasha15(p, **kw)
    cases2 = [(dict(delta=0.0), "delta"), (dict(eta=-1.0), "eta"), (dict(hvp="bfgs"), "hvp"),
              (dict(variant="fast"), "variant"), (dict(L2=0.0), "L2"), (dict(fd_eps=0.0), "fd_eps")]
    for kw, word in cases2:
        with pytest.raises(ValueError, match=word):
            Natasha2(p, **kw)
    with pytest.raises(RuntimeError, match="closure"):
        Natasha15(p).step()
    with pytest.raises(RuntimeError, match="closure"):
        Natasha2(p).step()


def test_param_groups_and_lr_scheduler():
    net, xs, ys = _net_and_data()
    opt = Natasha15([{"params": net[0].parameters(), "lr": 0.05}, {"params": net[2].parameters()}], lr=0.1,
                    epoch_size=4, subepochs=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    w0 = net[0].weight.detach().clone()
    for j in range(4):
        opt.step(_closure(net, xs, ys, j))
        sched.step()
    assert not torch.equal(w0, net[0].weight)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    n2 = Natasha2([{"params": net[0].parameters(), "lr": 0.05}, {"params": net[2].parameters()}], lr=0.1,
                  epoch_size=4, subepochs=2, delta=100.0, eta=0.1, oja_iters=1)
    # raised by the first SVRG step: call 4 (Oja call, kick test, snapshot calls until mu has B = 4 gradients)
    with pytest.raises(ValueError, match="one lr"):
        for j in range(4):
            n2.step(_closure(net, xs, ys, j))


def test_nonfinite_gradient_skips_step_without_touching_state():
    x = torch.nn.Parameter(torch.ones(3))
    opt = Natasha15([x], lr=0.1, epoch_size=4, subepochs=2)
    opt.step(lambda: (x ** 2).sum())
    before = (x.detach().clone(), dict(opt.position), {k: v.clone() for k, v in opt.state[x].items()})
    opt.step(lambda: (x * float("nan")).sum())
    assert torch.equal(x.detach(), before[0]) and opt.position == before[1]
    assert all(torch.equal(opt.state[x][k], v) for k, v in before[2].items())
    assert opt.counters["skipped_steps"] == 1


def test_fp16_params_keep_fp32_state():
    x = torch.nn.Parameter(torch.ones(5, dtype=torch.float16))
    opt = Natasha15([x], lr=0.1, epoch_size=4, subepochs=2, snapshot_batches=1)
    for _ in range(3):
        opt.step(lambda: (x.float() ** 2).sum())
    assert opt.state[x]["anchor"].dtype == torch.float32 and opt.state[x]["mu"].dtype == torch.float32
    assert float(x.float().abs().max()) < 1.0
    sd = opt.state_dict()
    opt2 = Natasha15([torch.nn.Parameter(x.detach().clone())], lr=0.1, epoch_size=4, subepochs=2)
    opt2.load_state_dict(sd)
    assert next(iter(opt2.state.values()))["avg_sum"].dtype == torch.float32


# ----------------------------------------------------- issue-5 details with known answers
def test_natasha2_default_oja_iterations_is_ceil_inverse_delta_squared_capped():
    from natasha_ext.optim.natasha import MAX_DEFAULT_OJA_ITERS

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert Natasha2(p, delta=0.1).oja_iterations() == 100
    assert Natasha2(p, delta=0.3).oja_iterations() == math.ceil(1 / 0.09) == 12
    assert Natasha2(p, delta=1e-3).oja_iterations() == MAX_DEFAULT_OJA_ITERS  # 10^6 capped
    assert Natasha2(p, delta=1e-3, oja_iters=7).oja_iterations() == 7


@pytest.mark.parametrize("variant,length", [("faithful", 0.5 / 2.0), ("simplified", 0.5)])
def test_natasha2_kick_length_direction_and_philox_sign(variant, length):
    """From (1, 0) of the saddle H = diag(1, -1): Oja's v = +-e_y, v^T H v = -1 <= -delta/2, so the
    second call (the kick test on the next minibatch, the same f here) kicks y by
    sign * length * sign(v_y): length delta/L2 (faithful) or delta (report Alg. 3), sign the
    optimizer's next Philox draw after the start vector."""
    signs = set()
    for seed in range(6):
        p, f = _saddle()
        opt = Natasha2([p], lr=0.1, sigma=0.1, epoch_size=4, subepochs=2, delta=0.5, eta=0.5, oja_iters=60, L2=2.0,
                       variant=variant, seed=seed)
        opt.step(f)
        assert opt.counters["kicks"] == 0 and torch.equal(p.detach(), torch.tensor([1.0, 0.0], dtype=D))
        opt.step(f)
        replay = PhiloxStream(seed)
        w0 = torch.empty(2, dtype=D)
        replay.rademacher_([w0])
        sign = replay.sign() * float(torch.sign(w0[1]))
        signs.add(sign)
        assert opt.counters["kicks"] == 1 and opt.counters["oja_iterations"] == 60
        assert opt.counters["last_rayleigh"] == pytest.approx(-1.0, abs=1e-9)
        assert opt.rng.offset == replay.offset
        torch.testing.assert_close(p.detach(), torch.tensor([1.0, sign * length], dtype=D), rtol=0, atol=1e-12)
    assert signs == {1.0, -1.0}  # both directions occur across seeds


def test_natasha15_snapshot_batches_mu_and_faithful_step_known_answer():
    """f_i(x) = 1/2 ||x||^2 - b_i.x: grad f_i = x - b_i. With snapshot_batches=3, m = 3, sigma = s:
    calls 1-2 only accumulate mu; call 3 takes x_1 = x~ - lr mu with mu = x~ - mean(b_0..b_2);
    call 4: d = (x_1 - b_3) - (x~ - b_3) + mu + 2 s (x_1 - x~), x_2 = x_1 - lr d, and the sub-epoch
    ends with x = mean(x_0, x_1, x_2). Gradient counts: 1, 1, 1, then 2 (x_1 and x~)."""
    g = torch.Generator().manual_seed(5)
    b = torch.randn(4, 5, generator=g, dtype=D)
    x = torch.nn.Parameter(torch.randn(5, generator=g, dtype=D))
    xt = x.detach().clone()
    lr, s = 0.3, 0.25
    opt = Natasha15([x], lr=lr, sigma=s, epoch_size=6, subepochs=2, snapshot_batches=3)
    counts = []
    for i in range(3):
        opt.step(lambda: 0.5 * x @ x - b[i] @ x)
        counts.append(opt.counters["gradients"])
        if i < 2:
            assert torch.equal(x.detach(), xt)  # snapshot calls do not move the parameters
    mu = xt - b[:3].mean(0)
    torch.testing.assert_close(opt.state[x]["mu"], mu, rtol=1e-14, atol=1e-14)
    x1 = xt - lr * mu
    torch.testing.assert_close(x.detach(), x1, rtol=1e-14, atol=1e-14)
    opt.step(lambda: 0.5 * x @ x - b[3] @ x)
    counts.append(opt.counters["gradients"])
    d = (x1 - b[3]) - (xt - b[3]) + mu + 2 * s * (x1 - xt)
    x2 = x1 - lr * d
    torch.testing.assert_close(x.detach(), (xt + x1 + x2) / 3, rtol=1e-13, atol=1e-13)
    assert counts == [1, 2, 3, 5]
    assert opt.position["s"] == 1 and opt.position["t"] == 0 and opt.counters["subepochs"] == 1


def test_natasha2_counters_and_unused_parameters():
    """Counters a user logs add up; a parameter the loss never reaches is left exactly alone
    (kept out of Oja's vector, so kicks do not move it)."""
    p, f = _saddle()
    unused = torch.nn.Parameter(torch.randn(3, dtype=D))
    u0 = unused.detach().clone()
    opt = Natasha2([p, unused], lr=0.1, sigma=0.1, epoch_size=4, subepochs=2, delta=0.5, eta=0.5, oja_iters=8,
                   seed=1)
    for _ in range(30):
        opt.step(f)
    c = opt.counters
    assert torch.equal(unused.detach(), u0)
    assert c["kicks"] >= 1 and c["steps"] == 30 and c["skipped_steps"] == 0
    pending = int(opt.position["outer"] > 0)  # an Oja run awaiting its kick test (not yet in oja_runs)
    assert c["oja_iterations"] == 8 * (c["oja_runs"] + pending) and c["hvps"] == 9 * (c["oja_runs"] + pending) + c["kick_tests"]
    assert c["oja_runs"] + pending == c["kicks"] + c["epochs"] + opt.position["in_epoch"]
