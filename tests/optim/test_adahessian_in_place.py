"""AdaHessian's in-place update (AdaHessian._in_place_is_safe): taken when norms bound the update
below every dtype's largest finite value, bit-identical to the copy-check-commit path, and never
taken for an update that overflows (issue 19's guarantee, issue 14's cost: the copies were a third
of a ResNet-18 step)."""
import copy
import math

import pytest
import torch

from natasha_ext.optim import AdaHessian, HybridSGDAdaHessian
from tests.suites.optimizer_zoo import Problem


def _run(model, opt, prob, steps, dtype=None):
    for i in range(steps):
        x, y = prob.batch(i)
        if dtype is not None:
            x = x.to(dtype)
        opt.step(lambda: torch.nn.functional.mse_loss(model(x).float(), y.float()))


def _moments(opt):
    """The exp_avg tensor objects (held, so that identity checks cannot see a reused id)."""
    return [st["exp_avg"] for st in opt.state.values() if "exp_avg" in st]


def _same_objects(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.mark.parametrize("kwargs", [dict(), dict(update_each=2, weight_decay=0.01, hessian_power=0.5),
                                    dict(n_samples=3, block_size=4)], ids=["defaults", "schedule-wd-k", "probes"])
def test_in_place_path_is_taken_and_bit_identical_to_the_copy_path(kwargs):
    prob = Problem()
    m_fast, m_copy = prob.model(), prob.model()
    fast = AdaHessian(m_fast.parameters(), lr=0.05, seed=3, **kwargs)
    slow = AdaHessian(m_copy.parameters(), lr=0.05, seed=3, **kwargs)
    slow.IN_PLACE_MARGIN = math.inf  # the bound never holds: every step takes the copy path
    _run(m_fast, fast, prob, 1)
    _run(m_copy, slow, prob, 1)
    before, slow_before = _moments(fast), _moments(slow)
    _run(m_fast, fast, prob, 5)
    _run(m_copy, slow, prob, 5)
    assert _same_objects(_moments(fast), before)  # the same moment tensors, updated in place
    assert not any(x is y for x, y in zip(_moments(slow), slow_before))  # fresh copies swapped in
    for a, b in zip(m_fast.parameters(), m_copy.parameters()):
        assert torch.equal(a, b)
        for k in fast.state[a]:
            assert torch.equal(fast.state[a][k], slow.state[b][k]), k
    assert fast.counters == slow.counters


def test_hybrid_adahessian_phase_takes_the_in_place_path():
    prob = Problem()
    m = prob.model()
    opt = HybridSGDAdaHessian(m.parameters(), switch_threshold=1e9, seed=0)
    opt.report_validation_loss(0.5)  # below tl: AdaHessian from the next step
    _run(m, opt, prob, 2)
    before = _moments(opt)
    _run(m, opt, prob, 2)
    assert before and _same_objects(_moments(opt), before)


def test_the_bound_never_lets_an_overflowing_update_run_in_place():
    """fp16 parameters over a range of lr spanning finite and overflowing updates: whenever the
    in-place path is taken the result is finite and equals the copy path's; the bound refuses
    every lr whose update overflows, and some lr do take the in-place path."""
    prob = Problem()
    base = prob.model().half()
    opt0 = AdaHessian(base.parameters(), lr=0.05, seed=0)
    _run(base, opt0, prob, 2, torch.float16)
    in_place = overflowed = 0
    for lr in [10.0 ** e for e in range(-4, 10)]:
        m_fast, m_copy = copy.deepcopy(base), copy.deepcopy(base)
        fast = AdaHessian(m_fast.parameters(), lr=lr, seed=0)
        fast.load_state_dict(copy.deepcopy(opt0.state_dict()))  # torch.optim shares the tensors
        slow = AdaHessian(m_copy.parameters(), lr=lr, seed=0)
        slow.load_state_dict(copy.deepcopy(opt0.state_dict()))
        slow.IN_PLACE_MARGIN = math.inf
        for g in fast.param_groups + slow.param_groups:
            g["lr"] = lr
        before = _moments(fast)
        _run(m_fast, fast, prob, 1, torch.float16)
        _run(m_copy, slow, prob, 1, torch.float16)
        took_in_place = _same_objects(_moments(fast), before) and not fast.counters["skipped_steps"]
        if slow.counters["skipped_steps"]:  # the update overflows fp16
            overflowed += 1
            assert not took_in_place and fast.counters["skipped_steps"] == 1
        if took_in_place:
            in_place += 1
            assert all(torch.isfinite(p).all() for p in m_fast.parameters())
        for a, b in zip(m_fast.parameters(), m_copy.parameters()):
            assert torch.equal(a, b)
    assert in_place >= 3 and overflowed >= 3


def test_zero_curvature_where_the_denominator_is_eps():
    """A loss linear in the parameters (Hessian 0, so v = 0 and the denominator is eps): the
    update is lr |g| / eps, and the lr sweep crosses fp16's largest value. A bound without the
    1/eps term would run the overflowing steps in place (planted: it writes inf here)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 8, generator=g).half()
    skipped_at, in_place_at = [], []
    for lr in [0.01, 0.1, 1.0, 3.0, 10.0, 30.0, 100.0]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 1).half()
        opt = AdaHessian(lin.parameters(), lr=1e-6, seed=0)
        opt.step(lambda: lin(x).float().mean())  # a tiny first step creates the moments
        for group in opt.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in lin.parameters()]
        moments = _moments(opt)
        opt.step(lambda: lin(x).float().mean())
        if opt.counters["skipped_steps"]:
            skipped_at.append(lr)
            assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
        else:
            assert all(torch.isfinite(p).all() for p in lin.parameters())
            if _same_objects(_moments(opt), moments):
                in_place_at.append(lr)
    assert skipped_at and in_place_at and max(in_place_at) < min(skipped_at), (in_place_at, skipped_at)
