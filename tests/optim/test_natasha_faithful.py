"""Natasha1.5 / Natasha2 as Liu, Liu, Liu & Li write Allen-Zhu's algorithm ("Implementing and
evaluating Natasha2 with PyTorch", Columbia University project report, Alg. 1): mu from |S| = B
minibatches (line 24), the kick test on the full Hessian (line 19) estimated on fresh minibatches,
and Oja's step-size condition eta |lambda(H)| <= 1 checked."""
import warnings

import pytest
import torch

from natasha_ext.optim import Natasha2, Natasha15

D = torch.float64


def test_natasha15_default_mu_averages_B_minibatches_then_steps():
    """f_i(x) = 1/2 ||x||^2 - b_i.x, B = 6, p = 2, no snapshot_batches: the first B calls only
    gather mu = x~ - mean(b_0..b_5) (report Alg. 1 line 24, |S| = B); the B-th also takes
    x_1 = x~ - lr mu; call B+1: d = (x_1 - b_6) - (x~ - b_6) + mu + 2 sigma (x_1 - x~),
    x_2 = x_1 - lr d, and the sub-epoch ends at mean(x_0, x_1, x_2)."""
    g = torch.Generator().manual_seed(3)
    b = torch.randn(7, 4, generator=g, dtype=D)
    x = torch.nn.Parameter(torch.randn(4, generator=g, dtype=D))
    xt = x.detach().clone()
    lr, s = 0.2, 0.3
    opt = Natasha15([x], lr=lr, sigma=s, epoch_size=6, subepochs=2)
    for i in range(6):
        if i:
            assert torch.equal(x.detach(), xt), f"call {i} moved the parameters before mu had B gradients"
        opt.step(lambda: 0.5 * x @ x - b[i] @ x)
    mu = xt - b[:6].mean(0)
    torch.testing.assert_close(opt.state[x]["mu"], mu, rtol=1e-14, atol=1e-14)
    x1 = xt - lr * mu
    torch.testing.assert_close(x.detach(), x1, rtol=1e-14, atol=1e-14)
    opt.step(lambda: 0.5 * x @ x - b[6] @ x)
    d = (x1 - b[6]) - (xt - b[6]) + mu + 2 * s * (x1 - xt)
    torch.testing.assert_close(x.detach(), (xt + x1 + (x1 - lr * d)) / 3, rtol=1e-13, atol=1e-13)
    assert opt.counters["gradients"] == 6 + 2 and opt.counters["subepochs"] == 1


# ------------------------------------------------------------------------- the kick test
def _noisy_hessians(n=8, seed=0):
    """H_i = A + E_i with sum_i E_i = 0: the full Hessian A = diag(0.3, 1, 1.5, 2) is positive
    definite, while most minibatch Hessians have an eigenvalue below -0.1 = -delta/2."""
    g = torch.Generator().manual_seed(seed)
    a = torch.diag(torch.tensor([0.3, 1.0, 1.5, 2.0], dtype=D))
    e = torch.randn(n, 4, 4, generator=g, dtype=D)
    e = (e + e.transpose(1, 2)) / 2
    return a, a + (e - e.mean(0))


def _kick_decisions(kick_test_batches, outer=300):
    """Natasha2 on f_i(x) = 1/2 x^T H_i x with minibatches drawn uniformly; lr = 0, so only the
    kick decisions matter. Returns (tested v^T H v, v^T A v) per decision and the kick count."""
    a, hs = _noisy_hessians()
    x = torch.nn.Parameter(torch.zeros(4, dtype=D))
    opt = Natasha2([x], lr=0.0, sigma=0.0, epoch_size=2, subepochs=1, snapshot_batches=1, delta=0.2, eta=0.25,
                   oja_iters=20, kick_test_batches=kick_test_batches, seed=4)
    pick = torch.Generator().manual_seed(9)
    tested, true = [], []
    while opt.counters["oja_runs"] < outer:
        i = int(torch.randint(len(hs), (1,), generator=pick))
        runs = opt.counters["oja_runs"]
        opt.step(lambda: 0.5 * x @ hs[i] @ x)
        if opt.counters["oja_runs"] > runs:  # this call decided
            tested.append(opt.counters["last_rayleigh"])
            if kick_test_batches:
                v = opt.state[x]["oja_vector"]
                true.append(float(v @ a @ v))
    return torch.tensor(tested, dtype=D), torch.tensor(true, dtype=D), opt.counters["kicks"]


def test_kick_test_on_fresh_minibatch_is_unbiased_and_oja_batch_is_biased_low():
    """E_j[v^T H_j v | v] = v^T A v for a minibatch j drawn independently of Oja's: the tested
    quotient minus v^T A v averages to 0 within 3 standard errors. On Oja's own minibatch the
    quotient is ~ lambda_min(H_i) < 0 < 0.3 <= v^T A v for every unit v, so kicks come at every
    noisy minibatch; on fresh ones far less often."""
    tested, true, kicks_fresh = _kick_decisions(1)
    diff = tested - true
    se = float(diff.std() / len(diff) ** 0.5)
    assert abs(float(diff.mean())) < 3 * se, (float(diff.mean()), se)
    biased, _, kicks_reused = _kick_decisions(0)
    assert float(biased.mean()) < float(true.min()) - 0.5
    assert float(true.mean() - biased.mean()) > 10 * se  # the bias the fresh minibatch removes, resolved
    assert kicks_reused > 0.6 * 300 and kicks_fresh < 0.5 * kicks_reused, (kicks_fresh, kicks_reused)


def test_kick_test_batches_average_and_the_last_call_decides():
    """kick_test_batches = 3: the Oja call and two test calls do not move anything, the third test
    call decides on the mean of the three quotients (H = diag(-1, 2): v^T H v = -1 on each)."""
    p = torch.nn.Parameter(torch.tensor([0.5, 0.0], dtype=D))
    f = lambda: 0.5 * p[0] ** 2 * 2.0 - 0.5 * p[1] ** 2
    opt = Natasha2([p], delta=0.5, eta=0.3, oja_iters=60, kick_test_batches=3, seed=2)
    for _ in range(3):
        opt.step(f)
        assert opt.counters["kicks"] == 0 and torch.equal(p.detach(), torch.tensor([0.5, 0.0], dtype=D))
    opt.step(f)
    assert opt.counters["kicks"] == 1 and opt.counters["kick_tests"] == 3 and opt.counters["oja_runs"] == 1
    assert opt.counters["last_rayleigh"] == pytest.approx(-1.0, abs=1e-9)
    assert abs(float(p[1].detach())) == pytest.approx(0.5 / 1.0, abs=1e-9)  # kick length delta/L2


# ------------------------------------------------------------------------ Oja's step size
def _stiff():
    """H = diag(-1, 0.5, 30): eta = 0.1 breaks eta lambda_max <= 1 (I - eta H has -2 at the top)."""
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0, 0.0], dtype=D))
    h = torch.tensor([-1.0, 0.5, 30.0], dtype=D)
    return p, lambda: 0.5 * (h * p * p).sum()


def test_eta_violation_warns_once_and_leaves_eta():
    p, f = _stiff()
    opt = Natasha2([p], delta=0.1, eta=0.1, oja_iters=200, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):  # three outer iterations (Oja call + kick test, no kick: the epoch continues)
            opt.step(f)
            if opt.position["in_epoch"] and not opt.position["outer"]:
                opt.position["in_epoch"] = 0  # skip the epoch: the next call runs Oja again
    hits = [w for w in caught if issubclass(w.category, RuntimeWarning) and "eta * lambda_max" in str(w.message)]
    assert len(hits) == 1 and opt.counters["oja_runs"] == 3
    assert opt.param_groups[0]["eta"] == 0.1 and opt.counters["eta_adaptations"] == 0
    # with eta too large Oja found the top of the spectrum: no kick although lambda_min = -1
    assert opt.counters["last_rayleigh"] == pytest.approx(30.0, rel=1e-6) and opt.counters["kicks"] == 0


def test_eta_check_adapt_lowers_eta_and_finds_the_negative_curvature():
    p, f = _stiff()
    opt = Natasha2([p], delta=0.1, eta=0.1, oja_iters=200, eta_check="adapt", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the violation was repaired
        opt.step(f)
        opt.step(f)
    eta = opt.param_groups[0]["eta"]
    assert opt.counters["eta_adaptations"] >= 1 and eta * 30.0 <= 1.0 + 1e-9 and eta > 0.9 / 30.0
    assert opt.counters["last_rayleigh"] == pytest.approx(-1.0, abs=1e-3)
    assert opt.counters["kicks"] == 1


def test_new_arguments_are_checked_by_name():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for kw, word in [(dict(kick_test_batches=-1), "kick_test_batches"), (dict(kick_test_batches=1.5),
                     "kick_test_batches"), (dict(eta_check="ignore"), "eta_check")]:
        with pytest.raises((ValueError, TypeError), match=word):
            Natasha2(p, **kw)


def test_natasha2_resume_between_oja_call_and_kick_test_is_bit_identical():
    """The Oja vector and the trial epoch's mu live in the state_dict: save after the Oja call,
    resume, and the kick test and the steps after it agree exactly."""
    import io

    def run(split):
        torch.manual_seed(0)
        a, hs = _noisy_hessians(seed=1)
        x = torch.nn.Parameter(torch.randn(4, dtype=D))
        mk = lambda ps: Natasha2(ps, lr=0.05, sigma=0.1, epoch_size=4, subepochs=2, delta=0.2, eta=0.25,
                                 oja_iters=10, kick_test_batches=2, seed=6)
        opt = mk([x])
        for k in range(12):
            if k == split:
                assert opt.position["outer"] >= 1
                buf = io.BytesIO()
                torch.save({"x": x.detach(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf, weights_only=True)
                x = torch.nn.Parameter(ck["x"].clone())
                opt = mk([x])
                opt.load_state_dict(ck["opt"])
            opt.step(lambda: 0.5 * x @ hs[k % len(hs)] @ x + x.sum())
        return x.detach(), opt.counters

    x0, c0 = run(None)
    x1, c1 = run(1)
    assert torch.equal(x0, x1)
    assert {k: v for k, v in c0.items() if k != "last_rayleigh"} == {k: v for k, v in c1.items() if k != "last_rayleigh"}
    assert c0["last_rayleigh"] == c1["last_rayleigh"]
