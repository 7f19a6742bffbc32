"""KFAC / ANG / IFANG as torch.optim optimizers: state_dict round trip, hooks lifecycle,
deepcopy/pickle, errors, AMP dtypes, non-finite skip, fallback layers."""
import copy
import gc
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, IFANG, KFAC
from natasha_ext.optim.kfac import lambda_schedule


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _data(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)


def _train(m, opt, steps, start=0, closure=False, between=None):
    """``between()``: whatever else the training loop runs (after backward and after step)."""
    for i in range(start, start + steps):
        x, y = _data(i)
        if closure:
            opt.step(lambda: F.cross_entropy(m(x), y))
        else:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if between is not None:
                between()
            opt.step()
        if between is not None:
            between()


MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.05, cov_every=2, inv_every=3, weight_decay=1e-4),
    "kfac-eigh": lambda m: KFAC(m, lr=0.05, cov_every=1, inv_every=2, inverse="eigh"),
    "ang": lambda m: ANG(m, lr=0.05, cov_every=2, inv_every=3, lam_schedule="exp", total_steps=8),
    "ifang": lambda m: IFANG(m, lr=0.05, rank=2, lam_schedule="linear", total_steps=8),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_state_dict_round_trip_is_bit_identical(name):
    torch.manual_seed(0)
    m = _net()
    opt = MAKERS[name](m)
    _train(m, opt, 4)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    _train(m, opt, 4, start=4)
    ref = [p.detach().clone() for p in m.parameters()]

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    m2 = _net()
    m2.load_state_dict(ck["model"])
    opt2 = MAKERS[name](m2)
    opt2.load_state_dict(ck["opt"])
    assert opt2.counters["steps"] == 4
    if isinstance(opt2, ANG):
        assert opt2.current_lambda() == opt.__class__.current_lambda(opt2)
    _train(m2, opt2, 4, start=4)
    for a, b in zip(ref, m2.parameters()):
        assert torch.equal(a, b.detach())
    for p, q in zip(m.parameters(), m2.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


def test_closure_convention_matches_backward_workflow():
    torch.manual_seed(0)
    m1 = _net()
    m2 = copy.deepcopy(m1)
    o1, o2 = MAKERS["kfac"](m1), MAKERS["kfac"](m2)
    o2.rng.seed = o1.rng.seed  # the same Fisher targets (fisher='mc') in both
    _train(m1, o1, 3)
    _train(m2, o2, 3, closure=True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)


def test_hooks_removed_and_not_leaked():
    m = _net()
    opt = KFAC(m)
    assert len(m[0]._forward_hooks) == 1 and len(m[5]._forward_hooks) == 1
    opt.remove_hooks()
    assert len(m[0]._forward_hooks) == 0 and len(m[5]._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="attach"):
        opt.step()
    opt.attach(m)
    assert len(m[0]._forward_hooks) == 1
    _train(m, opt, 1)
    del opt
    gc.collect()
    assert len(m[0]._forward_hooks) == 0 and len(m[5]._forward_hooks) == 0
    # optimizer garbage-collected without remove_hooks: the weak hooks must not keep it alive
    opt = IFANG(m, total_steps=4)
    _train(m, opt, 1)
    del opt
    gc.collect()
    assert len(m[0]._forward_hooks) == 0


def test_deepcopy_and_pickle():
    m = _net()
    opt = ANG(m, total_steps=10)
    _train(m, opt, 2)
    c = copy.deepcopy(opt)
    pickle.loads(pickle.dumps(opt))
    assert c.counters["steps"] == 2 and c.current_lambda() == opt.current_lambda()
    with pytest.raises(RuntimeError, match="attach"):
        c.step()
    # a copied / pickled model carries inert hooks, not links to the optimizer
    m2 = copy.deepcopy(m)
    m3 = pickle.loads(pickle.dumps(m))
    steps = opt.counters["steps"]
    for mm in (m2, m3):
        mm(_data(0)[0]).sum().backward()
    assert not opt._collector._calls  # nothing captured from the copies
    # deepcopy of model and optimizer together, then re-attach on the copy
    m4, o4 = copy.deepcopy((m, opt))
    o4.attach(m4)
    _train(m4, o4, 1)
    assert o4.counters["steps"] == steps + 1


def test_errors():
    with pytest.raises(ValueError, match="no supported layer"):
        KFAC(nn.Sequential(nn.PReLU(3)))
    m = _net()
    with pytest.raises(TypeError, match="model"):
        KFAC(m.parameters())
    for kw, name in ((dict(lr=-1), "lr"), (dict(damping=0), "damping"), (dict(momentum=1.5), "momentum"),
                     (dict(stat_decay=1.0), "stat_decay"), (dict(cov_every=0), "cov_every"),
                     (dict(inverse="svd"), "inverse"), (dict(kl_clip=-1.0), "kl_clip")):
        with pytest.raises(ValueError, match=name):
            KFAC(m, **kw)
    with pytest.raises(ValueError, match="total_steps"):
        ANG(m, lam_schedule="linear")
    with pytest.raises(ValueError, match="lam_schedule"):
        ANG(m, lam_schedule="bogus", total_steps=3)
    with pytest.raises(ValueError, match="rank"):
        IFANG(m, rank=0, total_steps=3)
    # params + model: groups with per-group lr; weight and bias must share a group
    opt = KFAC([{"params": [m[0].weight, m[0].bias], "lr": 0.1},
                {"params": [m[1].weight, m[1].bias, m[5].weight, m[5].bias]}], model=m, lr=0.01,
               skip_layers=[nn.BatchNorm2d])
    assert opt.layer_names == ["0", "5"]
    with pytest.raises(ValueError, match="different param groups"):
        KFAC([{"params": [m[5].weight]}, {"params": [m[5].bias]}], model=m)
    r = repr(opt)
    assert "SGD fallback (1): 1 (skipped: skip_layers)" in r and "K-FAC layers (2)" in r


def test_fallback_layers_take_sgd_momentum_update():
    torch.manual_seed(0)
    m = _net()
    opt = KFAC(m, lr=0.1, momentum=0.0, skip_layers=[nn.BatchNorm2d])
    x, y = _data(0)
    F.cross_entropy(m(x), y).backward()
    w0, g = m[1].weight.detach().clone(), m[1].weight.grad.clone()
    opt.step()
    torch.testing.assert_close(m[1].weight.detach(), w0 - 0.1 * g)


def test_nonfinite_gradients_skip_without_touching_state():
    torch.manual_seed(0)
    m = _net()
    opt = MAKERS["kfac"](m)
    _train(m, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in m.parameters()]
    x, y = _data(9)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    m[5].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.counters["skipped_steps"] == 1
    for a, b in zip(params, m.parameters()):
        assert torch.equal(a, b.detach())
    after = opt.state_dict()
    for k, st in before["state"].items():
        for kk, v in st.items():
            assert torch.equal(v, after["state"][k][kk])


def test_amp_factors_stay_fp32():
    torch.manual_seed(0)
    m = _net()
    opt = KFAC(m, cov_every=1)
    x, y = _data(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(m(x), y)
    loss.backward()
    opt.step()
    for layer in (m[0], m[5]):
        st = opt.state[layer.weight]
        assert st["kfac_A"].dtype == torch.float32 and st["kfac_G"].dtype == torch.float32
        assert torch.isfinite(st["kfac_A_inv"]).all()


def test_bf16_parameters_keep_fp32_state():
    torch.manual_seed(0)
    m = _net().to(torch.bfloat16)
    opt = IFANG(m, total_steps=5, momentum=0.9)  # momentum is opt-in (the paper's step has none)
    x, y = _data(0)
    F.cross_entropy(m(x.bfloat16()), y).backward()
    opt.step()
    assert opt.state[m[5].weight]["momentum_buffer"].dtype == torch.float32
    assert opt.state[m[5].weight]["kfac_YA"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_lambda_schedules():
    for kind in ("linear", "exp", "cosine"):
        f = lambda_schedule(kind, 10)
        vals = [f(t) for t in range(12)]
        assert vals[0] == 0.0 and abs(vals[10] - 1.0) < 1e-12 and vals[11] == 1.0
        assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert lambda_schedule("exp", 10)(5) > lambda_schedule("linear", 10)(5)  # concave


def test_lr_scheduler_reads_group_lr():
    m = _net()
    opt = KFAC(m, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(m, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
