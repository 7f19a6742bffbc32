"""TrustRegion and ARC on problems with known answers (dense linear algebra, Rosenbrock,
a saddle), torch.optim conformity and the guarantees of the algorithm (Cauchy decrease,
bit-identical rejected steps, ellipsoidal = spherical in scaled coordinates)."""
import copy
import io
import math

import pytest
import torch

from natasha_ext.curvature import steihaug_cg
from natasha_ext.optim import ARC, TrustRegion



pytestmark = pytest.mark.usefixtures("one_thread")


def quad_problem(n=6, seed=0, indefinite=False):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    ev = torch.linspace(0.5, 5.0, n, dtype=torch.float64)
    if indefinite:
        ev[0] = -2.0
    H = Q @ torch.diag(ev) @ Q.T
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return H, b


def quad_closure(x, H, b):
    return lambda: 0.5 * x @ (H @ x) + b @ x


@pytest.mark.parametrize("norm", ["spherical", "rmsprop", "adagrad"])
def test_large_radius_gives_newton_step(norm):
    H, b = quad_problem()
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], radius=1e3, max_radius=1e4, norm=norm, cg_tol=1e-12, cg_max_iters=30)
    opt.step(quad_closure(x, H, b))
    newton = -torch.linalg.solve(H, b)
    assert opt.last_step["accepted"] and opt.last_step["reason"] == "converged"
    torch.testing.assert_close(x.detach(), newton, rtol=1e-8, atol=1e-10)
    assert abs(opt.last_step["rho"] - 1.0) < 1e-8  # the model is the function


@pytest.mark.parametrize("norm", ["spherical", "rmsprop"])
def test_small_radius_lands_on_boundary(norm):
    H, b = quad_problem(seed=1)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], radius=1e-3, norm=norm, beta=0.8, eps=1e-8)
    opt.step(quad_closure(x, H, b))
    assert opt.last_step["reason"] in ("boundary", "cauchy")
    a = torch.ones(6, dtype=torch.float64) if norm == "spherical" else opt.state[x]["square_avg"] + 1e-8
    s = x.detach()
    assert math.isclose(float(torch.sqrt((a * s * s).sum())), 1e-3, rel_tol=1e-9)


def _dense_steihaug(H, g, a, radius, **kw):
    n = g.numel()
    s, r, p = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    aa = a.clone()
    r.copy_(g)
    p.copy_(-g / a)  # the CG start tr_cg_init_ leaves: s = 0, r = g, p = -A^{-1} g
    rz0 = float(g @ (g / a))
    res = steihaug_cg(lambda vs: [H @ vs[0]], [g], [s], [r], [p], [aa], rz0, radius, **kw)
    return s, res


def test_negative_curvature_goes_to_boundary_along_it():
    H = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
    g = torch.tensor([1.0, 0.0], dtype=torch.float64)
    # p0 = -g has positive curvature; start with a direction of negative curvature instead:
    g2 = torch.tensor([0.0, 1.0], dtype=torch.float64)
    s, res = _dense_steihaug(H, g2, torch.ones(2, dtype=torch.float64), 0.5)
    assert res.reason == "negative_curvature"
    torch.testing.assert_close(s, torch.tensor([0.0, -0.5], dtype=torch.float64))
    # with positive-curvature start and indefinite H, CG still ends on the boundary
    s, res = _dense_steihaug(torch.tensor([[1.0, 0.9], [0.9, -1.0]], dtype=torch.float64), g,
                             torch.ones(2, dtype=torch.float64), 0.7)
    assert res.reason in ("negative_curvature", "boundary")
    assert math.isclose(float(s.norm()), 0.7, rel_tol=1e-12)


def test_model_decrease_at_least_cauchy_random():
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        n = 8
        M = torch.randn(n, n, generator=gen, dtype=torch.float64)
        H = 0.5 * (M + M.T) + (trial % 3 - 1) * 2 * torch.eye(n, dtype=torch.float64)
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        a = torch.rand(n, generator=gen, dtype=torch.float64) * 3 + 0.1
        radius = float(torch.rand(1, generator=gen)) * 3 + 0.01
        s, res = _dense_steihaug(H, g, a, radius, max_iters=int(trial % 5) + 1, tol=0.1)
        model = float(g @ s + 0.5 * s @ (H @ s))
        # independent Cauchy point in the A-norm: minimise m(-t A^-1 g) with ||t A^-1 g||_A <= radius
        d = -g / a
        t_max = radius / float(torch.sqrt((a * d * d).sum()))
        curv = float(d @ (H @ d))
        t = min(float(-(g @ d)) / curv, t_max) if curv > 0 else t_max
        cauchy = float(t * (g @ d) + 0.5 * t * t * curv)
        assert model <= cauchy + 1e-10 * abs(cauchy), (trial, model, cauchy)
        assert math.isclose(model, res.model, rel_tol=1e-8, abs_tol=1e-12)  # tracked model value is exact
        assert float(torch.sqrt((a * s * s).sum())) <= radius * (1 + 1e-10)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


@pytest.mark.parametrize("make", [
    lambda x: TrustRegion([x], radius=0.1, norm="spherical"),
    lambda x: TrustRegion([x], radius=0.1, norm="rmsprop"),
    # Adagrad's ellipsoid only grows (not uniformly equivalent, Sec. 4.1): it needs a larger max radius
    lambda x: TrustRegion([x], radius=0.1, norm="adagrad", max_radius=1e4, hvp="finite_difference", fd_eps=1e-7),
    lambda x: ARC([x], norm="spherical", seed=0),
    lambda x: ARC([x], norm="rmsprop", seed=0),
    lambda x: ARC([x], norm="spherical", subproblem="cg", seed=0),
], ids=["tr-spherical", "tr-rmsprop", "tr-adagrad-fd", "arc-spherical", "arc-rmsprop", "arc-cg"])
def test_converges_on_rosenbrock(make):
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    opt = make(x)
    for _ in range(150):
        opt.step(lambda: rosenbrock(x))
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    assert opt.counters["rejected"] > 0 and opt.counters["accepted"] > 0


def saddle(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4


@pytest.mark.parametrize("make", [
    lambda x: TrustRegion([x], radius=0.1, norm="spherical", seed=1),
    lambda x: TrustRegion([x], radius=0.1, norm="rmsprop", seed=1),
    lambda x: ARC([x], norm="spherical", seed=1),
    lambda x: ARC([x], norm="spherical", subproblem="cg", seed=1),
], ids=["tr-spherical", "tr-rmsprop", "arc-lanczos", "arc-cg"])
def test_escapes_saddle_where_gradient_methods_stall(make):
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    sgd_x = x.detach().clone().requires_grad_(True)
    sgd = torch.optim.SGD([sgd_x], lr=0.1)
    for _ in range(20):
        sgd.zero_grad()
        saddle(sgd_x).backward()
        sgd.step()
    assert torch.equal(sgd_x.detach(), torch.zeros(2, dtype=torch.float64))  # stuck: gradient is 0
    opt = make(x)
    for _ in range(60):
        opt.step(lambda: saddle(x))
    x = x.detach()
    assert abs(float(x[0])) < 1e-6 and abs(abs(float(x[1])) - 1 / math.sqrt(2)) < 1e-6
    assert math.isclose(float(saddle(x)), -0.25, abs_tol=1e-10)


@pytest.mark.parametrize("cls", [TrustRegion, ARC])
def test_rejected_steps_restore_parameters_bit_identically(cls):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    X, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    closure = lambda: torch.nn.functional.cross_entropy(net(X), y)
    kw = dict(radius=50.0, max_radius=100.0) if cls is TrustRegion else dict(sigma=1e-6)
    opt = cls(net.parameters(), **kw, seed=0)
    rejected = 0
    for _ in range(6):
        before = [p.detach().clone() for p in net.parameters()]
        opt.step(closure)
        if not opt.last_step["accepted"]:
            rejected += 1
            assert all(torch.equal(b, p) for b, p in zip(before, net.parameters()))
    assert rejected > 0


def test_ellipsoidal_equals_spherical_in_scaled_coordinates():
    """One rmsprop-TR step on f(w) equals one spherical-TR step on f(A^{-1/2} x) at x = A^{1/2} w."""
    H, b = quad_problem(n=5, seed=4, indefinite=True)
    w0 = torch.randn(5, dtype=torch.float64)
    w = w0.clone().requires_grad_(True)
    opt = TrustRegion([w], radius=0.3, norm="rmsprop", beta=0.8, eps=1e-3, cg_tol=1e-3)
    opt.step(quad_closure(w, H, b))
    g = H @ w0 + b
    a = 0.2 * g * g + 1e-3
    S = a.rsqrt()
    x = (w0 / S).clone().requires_grad_(True)
    opt2 = TrustRegion([x], radius=0.3, norm="spherical", cg_tol=1e-3)
    opt2.step(lambda: 0.5 * (S * x) @ (H @ (S * x)) + b @ (S * x))
    assert opt.last_step["reason"] == opt2.last_step["reason"]
    assert opt.last_step["iters"] == opt2.last_step["iters"]
    torch.testing.assert_close(w.detach(), S * x.detach(), rtol=1e-10, atol=1e-12)
    assert math.isclose(opt.last_step["rho"], opt2.last_step["rho"], rel_tol=1e-9)


def test_gauss_newton_equals_hessian_on_least_squares():
    torch.manual_seed(1)
    lin = torch.nn.Linear(4, 2).double()
    X, Y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    lin2 = copy.deepcopy(lin)

    def gn_closure():
        out = lin(X)
        return torch.nn.functional.mse_loss(out, Y), out

    o1 = TrustRegion(lin.parameters(), radius=1.0, curvature="gauss_newton", cg_tol=1e-10)
    o2 = TrustRegion(lin2.parameters(), radius=1.0, curvature="hessian", cg_tol=1e-10)
    o1.step(gn_closure)
    o2.step(lambda: torch.nn.functional.mse_loss(lin2(X), Y))
    for p, q in zip(lin.parameters(), lin2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert o1.last_step["backprops"] == 1 + 2 * o1.last_step["hvps"]
    # model=: a loss-only closure is paired with the module's output (what the training CLI uses)
    lin3 = copy.deepcopy(lin)
    lin4 = copy.deepcopy(lin)
    o3 = TrustRegion(lin3.parameters(), radius=1.0, curvature="gauss_newton", cg_tol=1e-10, model=lin3)
    o4 = TrustRegion(lin4.parameters(), radius=1.0, curvature="gauss_newton", cg_tol=1e-10)
    o3.step(lambda: torch.nn.functional.mse_loss(lin3(X), Y))
    o4.step(lambda: (lambda out: (torch.nn.functional.mse_loss(out, Y), out))(lin4(X)))
    for p, q in zip(lin3.parameters(), lin4.parameters()):
        assert torch.equal(p, q)
    assert not lin3._forward_hooks  # the hook lives only while the closure runs
    with pytest.raises(TypeError, match="loss, outputs"):
        o1.step(lambda: torch.nn.functional.mse_loss(lin(X), Y))


@pytest.mark.parametrize("kw,name", [
    (dict(eta=1.0), "eta"), (dict(eta=0.0), "eta"), (dict(gamma=1.0), "gamma"), (dict(gamma=0.5), "gamma"),
    (dict(radius=0.0), "radius"), (dict(radius=-1.0), "radius"), (dict(max_radius=1e-6), "max_radius"),
    (dict(eta_very_successful=0.001), "eta_very_successful"), (dict(norm="l1"), "norm"),
    (dict(beta=1.0), "beta"), (dict(eps=0.0), "eps"), (dict(cg_max_iters=0), "cg_max_iters"),
    (dict(cg_tol=0), "cg_tol"), (dict(curvature="fisher"), "curvature"), (dict(hvp="magic"), "hvp"),
])
def test_trust_region_invalid_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=name):
        TrustRegion([torch.zeros(2, requires_grad=True)], **kw)


@pytest.mark.parametrize("kw,name", [
    (dict(sigma=0.0), "sigma"), (dict(eta1=1.0), "eta1"), (dict(eta2=0.05), "eta2"), (dict(gamma=1.0), "gamma"),
    (dict(subproblem="newton"), "subproblem"), (dict(norm="x"), "norm"),
])
def test_arc_invalid_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=name):
        ARC([torch.zeros(2, requires_grad=True)], **kw)


def test_global_hyperparameters_must_agree_across_groups_and_closure_required():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    TrustRegion([{"params": [a], "norm": "spherical"}, {"params": [b], "beta": 0.9}])
    with pytest.raises(ValueError, match="global"):
        TrustRegion([{"params": [a]}, {"params": [b], "eta": 0.2}])
    with pytest.raises(RuntimeError, match="closure"):
        TrustRegion([a]).step()


def _net_problem():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    return net, (lambda n: (lambda: torch.nn.functional.cross_entropy(n(X), y)))


@pytest.mark.parametrize("cls,kw", [(TrustRegion, dict(radius=0.05)), (ARC, dict()),
                                    (ARC, dict(subproblem="cg")), (ARC, dict(norm_scale="initial_mean"))])
def test_state_dict_round_trip_is_bit_identical(cls, kw):
    net, mk = _net_problem()
    opt = cls(net.parameters(), seed=5, **kw)
    for _ in range(3):
        opt.step(mk(net))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(4):
        opt.step(mk(net))
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net2, _ = _net_problem()
    net2.load_state_dict(ck["model"])
    opt2 = cls(net2.parameters(), seed=99, **kw)
    opt2.load_state_dict(ck["opt"])
    for _ in range(4):
        opt2.step(mk(net2))
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    if cls is TrustRegion:
        assert opt.radius == opt2.radius
    else:
        assert opt.sigma == opt2.sigma
    assert opt.counters == opt2.counters
    opt3 = copy.deepcopy(opt)
    assert opt3.state_dict()["natasha"] == opt.state_dict()["natasha"]


def test_fp16_params_keep_fp32_state_and_nonfinite_skips():
    x = torch.tensor([0.5, -0.3], dtype=torch.bfloat16, requires_grad=True)
    opt = TrustRegion([x], radius=0.1)
    for _ in range(5):
        opt.step(lambda: (x.float() ** 2).sum())
    assert opt.state[x]["square_avg"].dtype == torch.float32
    assert float((x.detach().float() ** 2).sum()) < 0.34
    y = torch.tensor([1.0, 2.0], requires_grad=True)
    opt = TrustRegion([y])
    before = y.detach().clone()
    opt.step(lambda: (y * float("nan")).sum())
    assert opt.counters["skipped_steps"] == 1 and torch.equal(before, y.detach())
    assert "square_avg" not in opt.state[y] or torch.equal(opt.state[y]["square_avg"], torch.zeros(2))
