"""Issue 19's small contracts: step() without closure, horizon-free ANG/IFANG, ARC's adagrad norm,
meta-device parameters, the Philox stream on skipped steps, TrustRegion's model= across deepcopy."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import natasha_ext.optim as O
from tests.suites.optimizer_zoo import ZOO, Problem, case_params

NEEDS_CLOSURE = [c for c in ZOO if c.cls in ("AdaHessian", "HybridSGDAdaHessian", "KFAC", "ANG", "IFANG")]


@case_params(NEEDS_CLOSURE)
def test_step_without_closure_or_gradients_raises(case):
    m = Problem().model()
    opt = case.make(m)
    with pytest.raises(RuntimeError, match="no closure and no parameter has a gradient"):
        opt.step()


def test_adahessian_create_graph_form_still_works():
    prob = Problem()
    m = prob.model()
    opt = O.AdaHessian(m.parameters(), lr=0.05, seed=0)
    before = [p.detach().clone() for p in m.parameters()]
    prob.closure(m, 0)().backward(create_graph=True)
    opt.step()
    assert opt.counters["steps"] == 1 and opt.counters["hvps"] == 1
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


@pytest.mark.parametrize("cls", [O.IFANG, O.ANG])
def test_readme_example_needs_no_horizon(cls):
    prob = Problem()
    m = prob.model()
    opt = cls(m, lr=0.01, rank=1) if cls is O.IFANG else cls(m, lr=0.01)  # README's IFANG line
    assert opt.lam_schedule == "saturating"
    for i in range(3):
        opt.step(prob.closure(m, i))
    assert opt.counters["steps"] == 3
    assert opt.current_lambda() == pytest.approx(1.0 - math.exp(-3 / 10000))
    with_horizon = cls(m, lr=0.01, total_steps=10)  # total_steps given: linear over it, as before
    assert with_horizon.lam_schedule == "linear"


def test_arc_adagrad_norm_is_supported():
    prob = Problem(dtype=torch.float64)
    m = prob.model()
    # cubic term in A / mean(a_0): sigma_0 = 1 is on scale from the first step (in the raw A of the default
    # the first ~8 steps are rejections while sigma grows, more than this test's 6)
    opt = O.ARC(m.parameters(), norm="adagrad", sigma=1.0, seed=0, norm_scale="initial_mean")
    start = prob.full_loss(m)
    for i in range(6):
        opt.step(prob.closure(m, i))
    assert opt.counters["accepted"] >= 1 and prob.full_loss(m) < start
    assert torch.all(opt.state[next(m.parameters())]["square_avg"] > 0)  # the Adagrad sum of g^2


@case_params()
def test_meta_device_parameters_are_refused_at_construction(case):
    m = Problem().model().to("meta")
    with pytest.raises(ValueError, match="meta device"):
        case.make(m)


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "create_graph"])
def test_adahessian_skipped_step_draws_nothing(closure):
    prob = Problem()
    m = prob.model()
    opt = O.AdaHessian(m.parameters(), lr=0.05, seed=3)
    opt.step(prob.closure(m, 0))
    rng = dict(opt.rng.state_dict())
    bad = lambda: prob.closure(m, 1)() * float("nan")
    if closure:
        opt.step(bad)
    else:
        opt.zero_grad()
        bad().backward(create_graph=True)
        opt.step()
    assert opt.counters["skipped_steps"] == 1
    assert opt.rng.state_dict() == rng


def test_trust_region_model_survives_deepcopy():
    prob = Problem(dtype=torch.float64)
    m = prob.model()
    opt = O.TrustRegion(m.parameters(), radius=0.05, curvature="gauss_newton", model=m, seed=1)
    m2, opt2 = copy.deepcopy((m, opt))
    assert isinstance(opt2._model, nn.Module) and opt2._model is m2
    # a loss-only closure needs model= to pair the outputs: both copies take the same step
    opt.step(prob.closure(m, 0))
    opt2.step(prob.closure(m2, 0))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
