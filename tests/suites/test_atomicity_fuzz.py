"""Issue 19's invariant, fuzzed: every call on an optimizer either completes or leaves parameters
and state bit-identical, and nothing non-finite is ever written.

A seeded loop (stable seed per case) drives a random sequence through every optimizer of the
zoo: clean steps, steps whose loss is NaN/inf, ``add_param_group`` with a bad hyperparameter or with an fp64 parameter (a dtype mix),
``param_groups`` edited to a bad value (refused at the next ``step``), ``load_state_dict`` of
another optimizer class's state, and of a state whose tensors have the wrong shape. After each
refused or skipped call the parameters, the per-parameter state, the group hyperparameters and
the Philox stream must equal the snapshot taken before it; after every call all parameters and
state tensors must be finite.
"""
import copy
import random
import zlib

import pytest
import torch

from natasha_ext.optim import NonFiniteError
from tests.suites.optimizer_zoo import ZOO, Problem, case_params, state_tensors

SEQUENCE = 30
OPS = ("step", "nonfinite_step", "bad_group", "edit_group", "foreign_load", "bad_shape_load", "fp64_group")


def _snapshot(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": copy.deepcopy({i: st for i, st in enumerate(opt.state[p] for p in model.parameters())}),
        "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "n_params": [len(g["params"]) for g in opt.param_groups],
        "rng": dict(opt.rng.state_dict()),
    }


def _assert_same(a, b, what):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), f"{what}: parameters changed"
    assert a["groups"] == b["groups"] and a["n_params"] == b["n_params"], f"{what}: param groups changed"
    assert a["rng"] == b["rng"], f"{what}: Philox stream moved"
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys(), f"{what}: state keys of parameter {i} changed"
        for k in sa:
            same = torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k]
            assert same, f"{what}: state[{k!r}] of parameter {i} changed"


def _assert_finite(model, opt, what):
    assert all(torch.isfinite(p).all() for p in model.parameters()), f"{what}: non-finite parameter"
    assert all(torch.isfinite(t).all() for t in state_tensors(opt) if t.is_floating_point()), \
        f"{what}: non-finite state"


def _group_bad(case, opt):
    """(key, bad value) pairs of the case's bad list that are param-group hyperparameters."""
    bad = [(k, v) for k, v in case.bad if k in opt.param_groups[0]]
    return bad or [(k, float("nan")) for k in ("lr", "eps", "damping") if k in opt.param_groups[0]][:1]


def _foreign(case):
    """A zoo case of another optimizer class."""
    return next(c for c in ZOO if c.cls != case.cls)


@case_params()
def test_every_call_completes_or_changes_nothing(case):
    rnd = random.Random(zlib.crc32(case.name.encode()))  # stable across runs and Python versions
    prob = Problem()
    model = prob.model()
    opt = case.make(model)
    other = _foreign(case)
    other_model = prob.model()
    other_opt = other.make(other_model)
    other.run(prob, other_model, other_opt, 0, 1)
    foreign_sd = other_opt.state_dict()
    case.run(prob, model, opt, 0, 1)  # some state to protect
    i = 1
    for _ in range(SEQUENCE):
        op = rnd.choice(OPS)
        if op in ("nonfinite_step", "edit_group") and case.before_step is not None:
            case.before_step(opt, i)  # the training loop's own hook (hybrid's switch) is not the call under test
        before = _snapshot(model, opt)
        if op == "step":
            case.run(prob, model, opt, i, i + 1)
            i += 1
        elif op == "nonfinite_step":
            bad = rnd.choice([float("nan"), float("inf")])
            clean = case.closure(prob, model, i)

            def poisoned():
                out = clean()
                return (out[0] * bad, out[1]) if isinstance(out, tuple) else out * bad
            skipped = opt.counters["skipped_steps"]
            try:
                opt.step(poisoned)
            except NonFiniteError:
                pass
            assert opt.counters["skipped_steps"] == skipped + 1
            _assert_same(before, _snapshot(model, opt), op)
        elif op == "bad_group":
            key, value = rnd.choice(_group_bad(case, opt))
            extra = torch.nn.Parameter(torch.zeros(2))
            with pytest.raises((ValueError, TypeError)):
                opt.add_param_group({"params": [extra], key: value})
            _assert_same(before, _snapshot(model, opt), op)
        elif op == "edit_group":
            key, value = rnd.choice(_group_bad(case, opt))
            group = rnd.choice(opt.param_groups)
            old = group[key]
            group[key] = value
            with pytest.raises((ValueError, TypeError), match=key):
                opt.step(case.closure(prob, model, i))
            group[key] = old
            _assert_same(before, _snapshot(model, opt), op)
        elif op == "fp64_group":
            # a valid group of another precision (the loss does not reach it): accepted, then
            # every step still completes or changes nothing
            if len(opt.param_groups) < 3:
                opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]})
                assert len(opt.param_groups) == len(before["n_params"]) + 1
        elif op == "foreign_load":
            with pytest.raises((ValueError, TypeError, KeyError)):
                opt.load_state_dict(foreign_sd)
            _assert_same(before, _snapshot(model, opt), op)
        else:  # bad_shape_load: the optimizer's own state with one state tensor reshaped
            sd = opt.state_dict()
            victims = [(pid, k) for pid, st in sd["state"].items() for k, v in st.items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() > 1]
            if not victims:
                continue
            pid, k = rnd.choice(victims)
            sd["state"][pid] = dict(sd["state"][pid])
            sd["state"][pid][k] = torch.zeros(sd["state"][pid][k].numel() + 1, dtype=sd["state"][pid][k].dtype)
            with pytest.raises(ValueError, match="shape"):
                opt.load_state_dict(sd)
            _assert_same(before, _snapshot(model, opt), op)
        _assert_finite(model, opt, op)
