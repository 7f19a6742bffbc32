"""The two forms of the K-FAC family's damping: ``factor_damping`` (lam added to each factor,
Tang et al. 2021 eq. 8) and ``damping`` (gamma of the Kronecker block, sqrt(gamma) per factor,
Martens & Grosse 2015 Sec. 6.3): which one a group uses, and the errors when a group has none
or both."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, IFANG, KFAC


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def _step(model, opt):
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    opt.step(lambda: F.cross_entropy(model(x), y))


@pytest.mark.parametrize("cls", [KFAC, ANG, IFANG])
def test_each_form_gives_its_per_factor_lam(cls):
    m = _model()
    assert cls(m, damping=0.04)._factor_damping(0) == pytest.approx(0.2)  # sqrt(gamma)
    assert cls(m, factor_damping=0.04)._factor_damping(0) == 0.04
    g = cls(m, factor_damping=0.04).param_groups[0]
    assert g["damping"] is None  # factor_damping replaces damping (KFAC's default 1e-3 too)


def test_a_group_uses_the_form_it_names():
    m = _model()
    opt = ANG([{"params": m[0].parameters(), "damping": 0.09}, {"params": m[2].parameters()}], model=m)
    assert opt._factor_damping(0) == pytest.approx(0.3)  # the group's gamma, not the default lam
    assert opt._factor_damping(1) == 0.03
    opt = KFAC([{"params": m[0].parameters(), "factor_damping": 0.5}, {"params": m[2].parameters()}], model=m)
    assert opt._factor_damping(0) == 0.5 and opt._factor_damping(1) == pytest.approx(math.sqrt(1e-3))


def test_a_group_with_both_or_neither_form_is_refused_at_step():
    m = _model()
    opt = ANG(m)
    _step(m, opt)
    before = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["damping"] = 1e-3  # now both are set
    with pytest.raises(ValueError, match="param group 0: exactly one of damping .* and factor_damping"):
        _step(m, opt)
    opt.param_groups[0]["damping"] = opt.param_groups[0]["factor_damping"] = None
    with pytest.raises(ValueError, match="exactly one of damping"):
        _step(m, opt)
    assert opt.state_dict()["natasha"]["counters"] == before["natasha"]["counters"]
    with pytest.raises(ValueError, match="factor_damping"):
        ANG(m, factor_damping=-0.1)


def test_checkpoint_without_factor_damping_loads_as_block_damping():
    """state_dicts saved before factor_damping existed hold damping (gamma) only."""
    m = _model()
    opt = KFAC(m, damping=0.01)
    _step(m, opt)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["factor_damping"]
    fresh = KFAC(m, factor_damping=0.7)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["factor_damping"] is None and fresh._factor_damping(0) == pytest.approx(0.1)
