"""Hyperparameters are checked on every path, and loads are all-or-nothing (issue 19, items 1-2).

* ``add_param_group`` with a bad value is refused with an error naming the argument and the
  group, and leaves the optimizer as it was;
* a param group edited after construction (by a user or an LR scheduler) is checked again at
  ``step``, which then refuses before touching the parameters or the state;
* ``load_state_dict`` from another optimizer class, with a group key missing, or with a state
  tensor of the wrong shape (same parameter count) fails at load and changes nothing.
"""
import copy
import math

import pytest
import torch

from tests.suites.optimizer_zoo import ZOO, Problem, case_params, flat_params

NAN = float("nan")

#: per optimizer class: group hyperparameters and values that must be refused (from issue 19's probes)
BAD_GROUP_VALUES = {
    "AdaHessian": [("lr", NAN), ("betas", (1.0, 0.999)), ("hessian_power", NAN), ("weight_decay", NAN), ("eps", -1.0)],
    "HybridSGDAdaHessian": [("lr", NAN), ("sgd_lr", NAN), ("momentum", NAN), ("betas", (0.9, 1.0))],
    "Natasha15": [("lr", NAN), ("sigma", NAN), ("lr", -1.0)],
    "Natasha2": [("lr", NAN), ("sigma", -1.0), ("delta", NAN)],
    "KFAC": [("lr", NAN), ("damping", -1e-3), ("momentum", NAN), ("weight_decay", NAN)],
    "EKFAC": [("lr", NAN), ("damping", 0.0), ("momentum", 1.0)],
    "ANG": [("lr", NAN), ("damping", 0.0)],
    "IFANG": [("lr", NAN), ("damping", -1.0)],
    "TrustRegion": [("eps", -1.0), ("beta", NAN)],
    "ARC": [("eps", -1.0), ("norm", "l7")],
}
CASES = [(c, k, v) for c in ZOO for k, v in BAD_GROUP_VALUES[c.cls]]
IDS = [f"{c.name}-{k}={v!r}" for c, k, v in CASES]


def same(a, b) -> bool:
    """Bit-exact equality of nested state (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5)))
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def trained(case, steps=2, problem=None):
    pb = problem or Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, steps)
    return pb, m, o


@pytest.mark.parametrize("case,key,value", CASES, ids=IDS)
def test_add_param_group_refuses_bad_values(case, key, value):
    pb, m, o = trained(case)
    before = copy.deepcopy(o.state_dict())
    extra = torch.nn.Parameter(torch.zeros(3, dtype=pb.dtype))
    with pytest.raises((ValueError, TypeError), match=rf"param group 1: .*{key}"):
        o.add_param_group({"params": [extra], key: value})
    assert len(o.param_groups) == 1 and same(o.state_dict(), before)
    case.run(pb, m, o, 2, 3)  # and the optimizer still works


@pytest.mark.parametrize("case,key,value", CASES, ids=IDS)
def test_step_rechecks_edited_groups(case, key, value):
    pb, m, o = trained(case)
    o.param_groups[0][key] = value
    params, before = flat_params(m), copy.deepcopy(o.state_dict())
    with pytest.raises((ValueError, TypeError), match=rf"param group 0: .*{key}"):
        o.step(case.closure(pb, m, 2))
    assert torch.equal(flat_params(m), params) and same(o.state_dict(), before)


def _other_class(case):
    return next(c for c in ZOO[ZOO.index(case):] + ZOO if c.cls != case.cls)


@case_params()
def test_load_from_another_class_changes_nothing(case):
    other = _other_class(case)
    _, _, src = trained(other)
    pb, m, o = trained(case)
    params, before = flat_params(m), copy.deepcopy(o.state_dict())
    with pytest.raises(ValueError, match=f"saved by {other.cls}"):
        o.load_state_dict(src.state_dict())
    assert torch.equal(flat_params(m), params) and same(o.state_dict(), before)


def _first_state_tensor(sd):
    for pid, entry in sd["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return pid, key
    raise AssertionError("no per-parameter state tensor to corrupt")


# spherical TR/ARC keep no per-parameter state
@case_params([c for c in ZOO if c.kwargs.get("norm") != "spherical"])
def test_load_with_a_wrong_state_shape_fails_at_load(case):
    _, _, src = trained(case, steps=3)
    sd = copy.deepcopy(src.state_dict())
    pid, key = _first_state_tensor(sd)
    v = sd["state"][pid][key]
    sd["state"][pid][key] = v.new_zeros(tuple(n + 1 for n in v.shape))  # same count of tensors, other shape
    pb, m, o = trained(case, steps=1)
    params, before = flat_params(m), copy.deepcopy(o.state_dict())
    with pytest.raises(ValueError, match=rf"state\['{key}'\].*shape"):
        o.load_state_dict(sd)
    assert torch.equal(flat_params(m), params) and same(o.state_dict(), before)


@case_params()
def test_load_with_a_missing_group_key_fails_at_load(case):
    _, _, src = trained(case)
    sd = copy.deepcopy(src.state_dict())
    key = next(k for k in sd["param_groups"][0] if k != "params")
    del sd["param_groups"][0][key]
    pb, m, o = trained(case, steps=1)
    params, before = flat_params(m), copy.deepcopy(o.state_dict())
    with pytest.raises(ValueError, match=f"param group 0 .*lacks.*{key}"):
        o.load_state_dict(sd)
    assert torch.equal(flat_params(m), params) and same(o.state_dict(), before)
    o.load_state_dict(src.state_dict())  # the intact state dict still loads
    assert same(o.state_dict(), src.state_dict())
