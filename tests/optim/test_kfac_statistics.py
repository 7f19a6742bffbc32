"""Where K-FAC/ANG/IFANG statistics come from: the step's own forward/backward (a grad-enabled
pass between steps changes nothing), a warning when a layer gets none, and tied weights."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, IFANG, KFAC
from tests.optim.test_kfac_optim import _data, _net, _train

MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.05, cov_every=1, inv_every=2, seed=0),
    "ang": lambda m: ANG(m, lr=0.05, cov_every=1, inv_every=2, total_steps=8, seed=0),
    "ifang": lambda m: IFANG(m, lr=0.05, rank=2, total_steps=8, seed=0),
}


def _run(name, closure, validate, steps=4):
    torch.manual_seed(0)
    m = _net()
    opt = MAKERS[name](m)
    xv, _ = _data(99)
    # a validation forward without torch.no_grad(): after the training backward and between steps
    _train(m, opt, steps, closure=closure, between=(lambda: m(xv).sum()) if validate else None)
    return opt, [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("closure", [True, False], ids=["closure", "backward"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_grad_enabled_forward_between_steps_changes_nothing(name, closure):
    ref_opt, ref = _run(name, closure, validate=False)
    opt, got = _run(name, closure, validate=True)
    assert opt.counters["factor_updates"] == ref_opt.counters["factor_updates"] == 4
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_layer_without_statistics_is_named_once():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    # the empirical Fisher: its statistics come from each hooked call, not from the model output
    opt = KFAC(m, lr=0.05, cov_every=1, fisher="empirical")
    x = torch.randn(8, 3)
    # the first layer is called functionally: its weight gets a gradient, its hooks see nothing
    closure = lambda: m[2](m[1](F.linear(x, m[0].weight, m[0].bias))).pow(2).mean()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        opt.step(closure)
        opt.step(closure)
    msgs = [str(w.message) for w in seen if "statistics" in str(w.message)]
    assert len(msgs) == 1 and "['0']" in msgs[0], msgs
    assert opt.counters["factor_updates"] == 2  # the second layer still got its statistics


class _Twice(nn.Module):
    """y = second(tanh(first(x))) + head; ``tie`` makes first and second share weight and bias,
    else first is second (one module called twice): the same function either way."""

    def __init__(self, tie: bool):
        super().__init__()
        self.first = nn.Linear(4, 4)
        head = nn.Linear(4, 3)  # drawn before the tied copy: the same initial weights either way
        self.second = nn.Linear(4, 4) if tie else self.first
        if tie:
            self.second.weight = self.first.weight
            self.second.bias = self.first.bias
        self.head = head

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_tied_weight_is_one_layer_with_the_statistics_of_all_uses(name):
    # tied modules must train exactly like one module called at both places: one factor pair
    # from the statistics of both calls (not the second call's blended in as a later step's)
    runs = {}
    for tie in (False, True):
        torch.manual_seed(0)
        m = _Twice(tie)
        opt = MAKERS[name](m)
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.step(lambda: F.cross_entropy(m(x), y))
        runs[tie] = (opt, [p.detach().clone() for p in m.parameters()])
    tied = runs[True][0]
    assert tied.layer_names == ["first+second", "head"]
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)


def test_tied_weight_with_separate_biases_is_refused_naming_both_modules():
    m = _Twice(tie=True)
    m.second.bias = nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="'first' and 'second' share their weight but not their bias"):
        KFAC(m)
