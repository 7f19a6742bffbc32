"""EKFAC (George et al. 2018): the basis math against K-FAC and a dense Kronecker solve, the
per-example eigenvalue correction against per-example gradients from autograd, the refresh
schedule, checkpoint shapes, and training. The cross-check against curvlinops is in
test_ekfac_crosscheck.py; the zoo suites cover conformity, AMP/compile, non-finite inputs,
distributed runs and param-group validation."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.curvature.eigen_kronecker import (EigenKronecker, eigen_precondition, eigenbasis, pool_null_spaces,
                                                   projected_second_moment)
from natasha_ext.curvature.kronecker import DenseKronecker
from natasha_ext.optim import EKFAC

TOL = dict(rtol=1e-10, atol=1e-12)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, bias=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(18, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _grad_matrix(m, grads):
    w = grads[0].reshape(m.weight.shape[0], -1)
    return torch.cat([w, grads[1].reshape(-1, 1)], 1) if m.bias is not None else w


def _stepped(model, x, y, reduction="mean", **kw):
    """An EKFAC after two steps on (x, y) with lr 0 (the parameters stay where they are): the
    first builds the eigenbasis, the second folds the batch's per-example estimate into s*."""
    opt = EKFAC(model, lr=0.0, momentum=0.0, kl_clip=None, batch_averaged=reduction == "mean", **kw)
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y, reduction=reduction))
    return opt


def test_with_kronecker_eigenvalues_ekfac_is_kfac():
    """s* := (sigma_G + lam)(sigma_A + lam)^T with no damping makes EKFAC's direction (and the
    reductions the KL clip reads) K-FAC's factored-damping direction (G + lam I)^-1 T (A + lam I)^-1."""
    model, (x, y) = _cnn(), _data()
    opt = _stepped(model, x, y, stat_decay=0.0)
    layers = _layers(model)
    states = [copy.copy(opt.state[m.weight]) for m in layers]
    ts = [_grad_matrix(m, torch.autograd.grad(F.cross_entropy(model(x), y), [p for p in m.parameters()]))
          for m in layers]
    lam = 0.05
    for st in states:
        (sa, _), (sg, _) = eigenbasis([st["kfac_A"], st["kfac_G"]])
        st["ekfac_scale"] = torch.outer(sg + lam, sa + lam)
    ours, red = EigenKronecker.precondition(ts, states, [0.0] * len(ts), None)
    dense = DenseKronecker(inverse="eigh")
    dense.refresh(states, list(range(len(states))), [lam] * len(states), 0)
    ref, red_ref = dense.precondition(ts, states, [lam] * len(states), False)
    for i, (u, r) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(u, r, **TOL, msg=lambda m: f"layer {i}: {m}")
    torch.testing.assert_close(red, red_ref, **TOL)


def test_direction_is_the_damped_inverse_of_the_dense_block():
    """U = (U diag(s*) U^T + gamma I)^-1 vec T, with U = U_A (x) U_G in torch's column-major vec
    (vec(G T A) = (A^T (x) G) vec T): the rotation and the rescaling, against a dense solve."""
    model, (x, y) = _cnn(), _data()
    opt = _stepped(model, x, y, stat_decay=0.0)
    gamma = 1e-2
    for m in _layers(model):
        st = opt.state[m.weight]
        ua, ug, s = st["ekfac_UA"], st["ekfac_UG"], st["ekfac_scale"]
        t = torch.randn(s.shape, dtype=torch.float64)
        (u,), red = eigen_precondition([t], [ug], [ua], [s], [gamma])
        basis = torch.kron(ua, ug)
        block = basis @ torch.diag(s.t().reshape(-1)) @ basis.t() + gamma * torch.eye(s.numel(), dtype=s.dtype)
        want = torch.linalg.solve(block, t.t().reshape(-1)).reshape(t.shape[1], t.shape[0]).t()
        torch.testing.assert_close(u, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(red[0], torch.stack([(t * want).sum(), want.square().sum(), t.square().sum()]),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("batch_averaged", [True, False])
def test_scale_is_the_second_moment_of_per_example_gradients(batch_averaged):
    """s* = mean_n (U_G^T dW_n U_A)^2 with dW_n from autograd on example n alone (conv layers: the
    sum over positions; the last Linear: one position)."""
    model, (x, y) = _cnn(), _data()
    opt = _stepped(model, x, y, reduction="mean" if batch_averaged else "sum", stat_decay=0.0)
    layers = _layers(model)
    per_example = [[] for _ in layers]
    for n in range(x.shape[0]):
        loss = F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
        for k, m in enumerate(layers):
            per_example[k].append(_grad_matrix(m, torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)))
    for k, m in enumerate(layers):
        st = opt.state[m.weight]
        rotated = torch.stack([st["ekfac_UG"].t() @ d @ st["ekfac_UA"] for d in per_example[k]])
        torch.testing.assert_close(st["ekfac_scale"], rotated.square().mean(0), **TOL)


def test_refresh_resets_the_scale_to_the_kronecker_eigenvalues():
    """inv_every=3, cov_every=2: the refresh of step 3 falls on a step without statistics, so s*
    is exactly sigma_G (x) sigma_A of the current factors after it; before it, the EMA has moved s*."""
    model, (x, y) = _cnn(), _data()
    opt = EKFAC(model, lr=0.05, cov_every=2, inv_every=3, stat_decay=0.5)
    w = _layers(model)[0].weight

    def kron_eigenvalues():
        (sa, _), (sg, _) = eigenbasis([opt.state[w]["kfac_A"], opt.state[w]["kfac_G"]])
        return torch.outer(sg, sa)

    for _ in range(3):
        opt.step(lambda: F.cross_entropy(model(x), y))
    assert not torch.allclose(opt.state[w]["ekfac_scale"], kron_eigenvalues(), rtol=1e-6, atol=0)
    opt.step(lambda: F.cross_entropy(model(x), y))  # step 3: refresh, no statistics
    assert opt.counters["inverse_updates"] == 2 and opt.counters["factor_updates"] == 2
    torch.testing.assert_close(opt.state[w]["ekfac_scale"], kron_eigenvalues(), **TOL)


def test_load_with_a_wrong_scale_shape_fails_at_load():
    model, (x, y) = _cnn(), _data()
    sd = _stepped(model, x, y).state_dict()
    pid = next(p for p, e in sd["state"].items() if "ekfac_scale" in e)
    sd["state"][pid]["ekfac_scale"] = sd["state"][pid]["ekfac_scale"].t().contiguous()
    fresh = _stepped(_cnn(), x, y)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"state\['ekfac_scale'\].*shape"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh.state_dict()["state"][pid]["ekfac_scale"], before["state"][pid]["ekfac_scale"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_loss_decreases_over_20_steps(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                          nn.Linear(16, 3)).to(dtype)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(4, 32, 2, 6, 6, generator=g).to(dtype)
    ys = torch.randint(0, 3, (4, 32), generator=g)
    opt = EKFAC(model, lr=0.05, damping=1e-2, inv_every=5)
    assert opt.fallback_names == [] and len(opt.layer_names) == 3

    def full_loss():
        with torch.no_grad():
            return sum(F.cross_entropy(model(x), y) for x, y in zip(xs, ys)).item() / len(xs)

    start = full_loss()
    for i in range(20):
        opt.step(lambda: F.cross_entropy(model(xs[i % 4]), ys[i % 4]))
    assert opt.counters["inverse_updates"] == 4 and opt.counters["skipped_steps"] == 0
    assert full_loss() < 0.5 * start


def test_scheduled_refresh_uses_the_factors_before_the_step_and_then_folds_the_batch():
    """inv_every=2, cov_every=1: step 2's basis is the eigenbasis of the factors left by step 1
    (so that step 2's s* can join its factors in one all-reduce), and s* is then
    stat_decay sigma_G (x) sigma_A + (1 - stat_decay) s*_batch, not K-FAC's eigenvalues alone."""
    model, (x, y) = _cnn(), _data()
    opt = EKFAC(model, lr=0.05, inv_every=2, stat_decay=0.5)
    w = _layers(model)[0].weight
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y))
    a1, g1 = opt.state[w]["kfac_A"].clone(), opt.state[w]["kfac_G"].clone()
    # a new batch: the first layer's inputs, and so its A, would otherwise repeat bit for bit
    # (0.5 A + 0.5 A = A exactly wherever the batch covariance is computed deterministically)
    x2, y2 = _data(seed=2)
    opt.step(lambda: F.cross_entropy(model(x2), y2))
    (sa, ua), (sg, ug) = eigenbasis([a1, g1])
    assert torch.equal(opt.state[w]["ekfac_UA"], ua) and torch.equal(opt.state[w]["ekfac_UG"], ug)
    assert not torch.equal(opt.state[w]["kfac_A"], a1)
    assert not torch.allclose(opt.state[w]["ekfac_scale"], torch.outer(sg, sa), rtol=1e-6, atol=0)
    assert opt.counters["inverse_updates"] == 2


def test_the_step_does_not_depend_on_the_null_space_basis_eigh_returns():
    """A from 3 examples in 7 dims (a 4-dim null space, plus G's from 2 examples in 4 dims): any
    orthonormal basis of the null spaces is an eigenbasis. With s* pooled there, a new batch (which
    has null-space components) gives the same direction in a rotated basis; per direction it would
    not (the check has teeth)."""
    g = torch.Generator().manual_seed(5)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    a_rows, g_rows = rnd(3, 7), rnd(2, 4)
    (sa, ua), (sg, ug) = eigenbasis([a_rows.t() @ a_rows, g_rows.t() @ g_rows])
    assert int((sa == 0).sum()) == 4 and int((sg == 0).sum()) == 2

    def rotated(u, s):
        k = int((s == 0).sum())
        q = torch.linalg.qr(rnd(k, k))[0]
        return torch.cat([u[:, :k] @ q, u[:, k:]], 1)

    ua2, ug2 = rotated(ua, sa), rotated(ug, sg)
    calls = [(rnd(5, 1, 7), rnd(5, 1, 4)), (rnd(2, 3, 7), rnd(2, 3, 4))]  # one Linear call, one with 3 positions
    t = rnd(4, 7)

    def direction(ua, ug, pool):
        s = projected_second_moment(calls, ua, ug, True)
        if pool:
            pool_null_spaces(s, sg, sa)
        return eigen_precondition([t], [ug], [ua], [s], [1e-2])[0][0]

    torch.testing.assert_close(direction(ua2, ug2, True), direction(ua, ug, True), **TOL)
    assert not torch.allclose(direction(ua2, ug2, False), direction(ua, ug, False), rtol=1e-3, atol=0)
