"""An AdaHessian update that overflows the parameters' dtype is detected before anything is
written (issue 19 item 6): skipped (counted) or NonFiniteError, parameters and state untouched."""
import pytest
import torch

from natasha_ext.optim import AdaHessian, NonFiniteError
from tests.suites.optimizer_zoo import Problem


def _snapshot(m, opt):
    params = [p.detach().clone() for p in m.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    return params, state, dict(opt.rng.state_dict())


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert a[1][k].keys() == b[1][k].keys() and all(torch.equal(a[1][k][n], b[1][k][n]) for n in a[1][k])
    assert a[2] == b[2]


@pytest.mark.parametrize("raise_on_nonfinite", [True, False])
def test_fp16_update_overflow_writes_nothing(raise_on_nonfinite):
    prob = Problem()
    m = prob.model().half()
    opt = AdaHessian(m.parameters(), lr=0.05, seed=0, raise_on_nonfinite=raise_on_nonfinite)
    closure = lambda: \
        torch.nn.functional.mse_loss(m(prob.X[0].half()).float(), prob.Y[0])
    opt.step(closure)  # an ordinary step: state to keep
    before = _snapshot(m, opt)
    for g in opt.param_groups:
        g["lr"] = 1e9  # |update| ~ lr: far past fp16's 65504
    if raise_on_nonfinite:
        with pytest.raises(NonFiniteError, match="overflows"):
            opt.step(closure)
    else:
        opt.step(closure)
        assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 1
    _same(before, _snapshot(m, opt))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    for g in opt.param_groups:  # back to a sane lr: the next step is an ordinary one
        g["lr"] = 0.05
    opt.step(closure)
    assert opt.counters["steps"] == 2 and all(torch.isfinite(p).all() for p in m.parameters())


def test_first_step_overflow_creates_no_state():
    prob = Problem()
    m = prob.model().half()
    opt = AdaHessian(m.parameters(), lr=1e9, seed=0)
    opt.step(lambda: torch.nn.functional.mse_loss(m(prob.X[0].half()).float(), prob.Y[0]))
    assert opt.counters["skipped_steps"] == 1 and not any(opt.state.values())  # no moments, no step counts
