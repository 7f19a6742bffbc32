"""TrustRegion/ARC at the dtype's resolution (radius floor, sigma ceiling) and non-finite
trial points (a skipped step, not a rejection)."""
import math

import pytest
import torch

from natasha_ext.optim import ARC, NonFiniteError, TrustRegion


def _closure(x, trial_offset):
    """sum(x^2) on the gradient/curvature passes; ``trial_offset`` added when evaluated without grad
    (the trial point), so every step is rejected (offset 1) or its trial loss is NaN."""
    def closure():
        loss = (x * x).sum()
        return loss if torch.is_grad_enabled() else loss + trial_offset
    return closure


@pytest.mark.parametrize("cls", [TrustRegion, ARC])
def test_rejections_stop_at_the_dtype_resolution(cls):
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 10))
    opt = cls([x], norm="spherical", **(dict(radius=0.1) if cls is TrustRegion else {}))
    for _ in range(200):
        opt.step(_closure(x, 1.0))
    # every step rejected (ARC's first, a Newton step from sigma = 1, gains more than the offset)
    assert opt.counters["rejected"] >= 199 and opt.counters["steps"] == 200
    xa = float(x.detach().norm())  # spherical: ||x||_A = ||x||
    resolution = torch.finfo(torch.float32).eps * xa
    assert opt.counters["resolution_limit_hits"] >= 150  # every rejection after the first ~20
    if cls is TrustRegion:
        assert resolution / 2 <= opt.radius <= resolution * (1 + 1e-5)  # old code: 0.1 / 2^200
    else:
        g = 2 * xa  # ||g|| of sum(x^2)
        assert math.isfinite(opt.sigma) and opt.sigma <= 2 * g / resolution ** 2  # old code: 2^200


@pytest.mark.parametrize("cls", [TrustRegion, ARC])
def test_nonfinite_trial_loss_is_a_skipped_step(cls):
    x = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 10))
    opt = cls([x], norm="rmsprop")
    opt.step(_closure(x, 0.0))  # one ordinary step: an ellipsoid to keep
    before = (x.detach().clone(), opt.state[x]["square_avg"].clone(), dict(opt.counters))
    opt.step(_closure(x, float("nan")))
    assert torch.equal(x.detach(), before[0])
    assert torch.equal(opt.state[x]["square_avg"], before[1])
    c = opt.counters
    assert c["skipped_steps"] == 1 and c["rejected"] == before[2]["rejected"]
    assert c["steps"] == before[2]["steps"]  # a skipped step is not a step
    assert opt.last_step["reason"] == "nonfinite_trial_loss"
    strict = cls([x], norm="rmsprop", raise_on_nonfinite=True)
    with pytest.raises(NonFiniteError, match="trial point"):
        strict.step(_closure(x, float("inf")))
    assert torch.equal(x.detach(), before[0])


@pytest.mark.parametrize("cls", [TrustRegion, ARC])
def test_skipped_steps_are_not_counted_as_steps(cls):
    x = torch.nn.Parameter(torch.ones(3))
    opt = cls([x])
    opt.step(lambda: (x * x).sum() * float("nan"))
    assert opt.counters["skipped_steps"] == 1 and opt.counters["steps"] == 0
