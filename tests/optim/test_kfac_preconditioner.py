"""KFACPreconditioner: K-FAC / ANG / IFANG directions written into .grad for torch optimizers.

* under SGD(momentum=0) it takes the steps of the KFAC / ANG / IFANG optimizers (KL clip and an
  LR scheduler included): that pins the math to the optimizers';
* k micro-batches (accumulation_steps=k) give the preconditioned gradient of the concatenated
  batch, under SGD and Adam;
* GradScaler: a power-of-two scale changes nothing; an overflow skips the step and changes
  nothing; scaled gradients are refused;
* state_dict resume is bit-identical (2N straight vs N + save/load into fresh objects + N);
* every bad argument is an error naming it, and a failed call changes nothing.
"""
import inspect
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, EKFAC, IFANG, KFAC, KFACPreconditioner, NonFiniteError

# the deterministic Fisher where the optimizers offer a choice (MC targets are drawn per pass, so
# k micro-batches or 2 ranks would equal the concatenated batch only in distribution)
FISHER = {"fisher": "empirical"} if "fisher" in inspect.signature(KFAC.__init__).parameters else {}
SETTINGS = {"kfac": dict(cov_every=2, inv_every=3, **FISHER),
            "ang": dict(cov_every=2, inv_every=3, lam_schedule="linear", total_steps=6, **FISHER),
            "ifang": dict(rank=3, lam_schedule="linear", total_steps=6, **FISHER),
            "ekfac": dict(inv_every=3)}
OPTIMIZER_OF = {"kfac": KFAC, "ang": ANG, "ifang": IFANG, "ekfac": EKFAC}
METHODS = sorted(SETTINGS)
TORCH_OPTIMIZERS = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}


def _net(bn=True, dtype=torch.float64):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + \
             [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)]
    return nn.Sequential(*layers).to(dtype)


def _data(i, n=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _factors(pc):
    """The preconditioner's per-parameter state tensors (factors, inverses), in a fixed order."""
    state = pc.state_dict()["engine"]["state"]
    return [(pid, k, v) for pid in sorted(state) for k, v in sorted(state[pid].items())]


def _same_factors(pc1, pc2, **tol):
    f1, f2 = _factors(pc1), _factors(pc2)
    assert [(a, b) for a, b, _ in f1] == [(a, b) for a, b, _ in f2]
    for (_, _, u), (_, _, v) in zip(f1, f2):
        if tol:
            torch.testing.assert_close(v, u, **tol)
        else:
            assert torch.equal(u, v)


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def _equal(xs, ys):
    return all(torch.equal(a, b) for a, b in zip(xs, ys))


def _train(m, pc, opt, start, steps, sched=None):
    for i in range(start, start + steps):
        x, y = _data(i)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        pc.step()
        opt.step()
        if sched is not None:
            sched.step()


# ---------------------------------------------------------------------- the optimizers' steps
@pytest.mark.parametrize("method", METHODS)
def test_sgd_reproduces_the_optimizer_with_kl_clip_and_lr_schedule(method):
    """KFACPreconditioner + SGD(lr, momentum=0) == KFAC/ANG/IFANG(lr, momentum=0), the KL clip
    reading the scheduled lr of the torch optimizer; BatchNorm is a fallback layer in both."""
    m1 = _net()
    o1 = OPTIMIZER_OF[method](m1, lr=0.2, momentum=0.0, kl_clip=1e-2, **SETTINGS[method])
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    m2 = _net()
    sgd = torch.optim.SGD(m2.parameters(), lr=0.2)
    s2 = torch.optim.lr_scheduler.StepLR(sgd, step_size=2, gamma=0.5)
    pc = KFACPreconditioner(m2, method, kl_clip=1e-2, lr=sgd, **SETTINGS[method])
    assert pc.layer_names == o1.layer_names and pc.fallback_names == o1.fallback_names
    for i in range(6):
        x, y = _data(i)
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        o1.step()
        s1.step()
    _train(m2, pc, sgd, 0, 6, s2)
    assert _equal(m1.parameters(), m2.parameters())
    assert pc.counters == o1.counters
    if method in ("ang", "ifang"):
        assert torch.equal(pc.last_coefficients, o1.last_coefficients)
    # the clip and the schedule matter: without the clip the steps differ
    m3 = _net()
    sgd3 = torch.optim.SGD(m3.parameters(), lr=0.2)
    _train(m3, KFACPreconditioner(m3, method, **SETTINGS[method]), sgd3, 0, 6,
           torch.optim.lr_scheduler.StepLR(sgd3, step_size=2, gamma=0.5))
    assert not _equal(m2.parameters(), m3.parameters())


def test_lr_forms_agree():
    """lr= as the optimizer, a callable or a float: the same KL clip while the lr is constant."""
    runs = []
    for form in ("optimizer", "callable", "float"):
        m = _net()
        sgd = torch.optim.SGD(m.parameters(), lr=0.1)
        lr = {"optimizer": sgd, "callable": lambda: sgd.param_groups[0]["lr"], "float": 0.1}[form]
        _train(m, KFACPreconditioner(m, "kfac", kl_clip=1e-3, lr=lr, cov_every=1, inv_every=1), sgd, 0, 3)
        runs.append([p.detach().clone() for p in m.parameters()])
    assert _equal(runs[0], runs[1]) and _equal(runs[0], runs[2])


@pytest.mark.parametrize("opt_name", sorted(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_trains_under_sgd_and_adam(method, opt_name):
    """20 steps on a teacher's labels, KL clip reading the torch optimizer's lr: the loss falls."""
    torch.manual_seed(0)
    teacher = nn.Linear(10, 3)
    data = [(x, teacher(x).argmax(1)) for x in torch.randn(20, 64, 10)]
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = {"sgd": lambda: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
           "adam": lambda: torch.optim.Adam(m.parameters(), lr=3e-3)}[opt_name]()
    # EKFAC adds gamma to the eigenvalues themselves, K-FAC sqrt(gamma) to each factor: at the same
    # 1e-3 EKFAC is far less damped, and its raw directions stall Adam (1.16 -> 1.04); 0.1 trains
    pc = KFACPreconditioner(m, method, kl_clip=1e-3, lr=opt, **({"damping": 0.1} if method == "ekfac" else {}))
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss.item())
        assert pc.step()
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert pc.counters["steps"] == 20 and not pc.fallback_names


# ---------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("opt_name", sorted(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_two_micro_batches_equal_the_concatenated_batch(method, opt_name):
    """accumulation_steps=2 with (loss / 2).backward() per half == one pass on the whole batch:
    the preconditioned .grad at every step (fp64 round-off) and the parameters after 4 steps.
    IFANG rank 3 over 32 examples: its middle row group straddles the two micro-batches."""
    m1, m2 = _net(bn=False), _net(bn=False)
    p1 = KFACPreconditioner(m1, method, **SETTINGS[method])
    p2 = KFACPreconditioner(m2, method, accumulation_steps=2, **SETTINGS[method])
    o1, o2 = TORCH_OPTIMIZERS[opt_name](m1.parameters()), TORCH_OPTIMIZERS[opt_name](m2.parameters())
    for i in range(4):
        x, y = _data(i, n=32)
        o1.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        p1.step()
        o2.zero_grad()
        for half in (slice(0, 16), slice(16, 32)):
            (F.cross_entropy(m2(x[half]), y[half]) / 2).backward()
        p2.step()
        for a, b in zip(_grads(m1), _grads(m2)):
            # EKFAC: eigh's eigenvectors carry the round-off of two summation orders further
            # (5e-10 relative on a Xeon's BLAS); a wrong accumulation is O(1)
            torch.testing.assert_close(b, a, **(dict(rtol=1e-8, atol=1e-10) if method == "ekfac" else
                                                dict(rtol=1e-10, atol=1e-12)))
        o1.step()
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert p2.counters == p1.counters


def test_step_refuses_a_wrong_number_of_micro_batches():
    m = _net(bn=False)
    pc = KFACPreconditioner(m, "kfac", accumulation_steps=2, cov_every=1, inv_every=1)
    x, y = _data(0, n=32)
    (F.cross_entropy(m(x[:16]), y[:16]) / 2).backward()
    before = _grads(m)
    with pytest.raises(RuntimeError, match="accumulation_steps=2 but 1 training forward"):
        pc.step()
    assert _equal(before, _grads(m)) and pc.counters["steps"] == 0 and not _factors(pc)
    with torch.no_grad():  # an evaluation pass does not count
        m(x)
    (F.cross_entropy(m(x[16:]), y[16:]) / 2).backward()
    assert pc.step()
    with pytest.raises(RuntimeError, match="but 0 training forward"):  # preconditioning twice
        pc.step()


# ---------------------------------------------------------------------- AMP
def _amp_step(m, pc, opt, scaler, i, dtype, poison=False):
    x, y = _data(i, dtype=torch.float32)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        loss = F.cross_entropy(m(x), y)
    scaler.scale(loss).backward()
    if poison:
        m[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.unscale_(opt)
    done = pc.step()
    scaler.step(opt)
    scaler.update()
    return done


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_grad_scaler_under_autocast(method, dtype):
    """A power-of-two loss scale changes nothing (the scale is divided out of G, .grad is
    unscaled first); an overflow skips the preconditioner (nothing changed) and the optimizer."""
    runs = []
    for scale in (None, 2.0 ** 10):
        m = _net(dtype=torch.float32)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale or 1.0, enabled=scale is not None)
        pc = KFACPreconditioner(m, method, grad_scaler=scaler, **SETTINGS[method])
        for i in range(3):
            assert _amp_step(m, pc, opt, scaler, i, dtype)
        runs.append((m, pc, opt, scaler))
    (m1, pc1, _, _), (m2, pc2, opt, scaler) = runs
    # bf16 keeps fp32's exponent range: scaling by 2^10 is exact. fp16 gradients below 2^-24
    # flush to zero without the scale (what the scaler is for): close, not equal
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, **tol)
    _same_factors(pc1, pc2, **tol)
    assert all(v.dtype == torch.float32 for _, _, v in _factors(pc2))

    saved, params = [v.clone() for _, _, v in _factors(pc2)], [p.detach().clone() for p in m2.parameters()]
    scale = scaler.get_scale()
    assert not _amp_step(m2, pc2, opt, scaler, 3, dtype, poison=True)
    assert pc2.counters["skipped_steps"] == 1 and pc2.counters["steps"] == 3
    assert _equal(params, m2.parameters()) and scaler.get_scale() == scale / 2
    assert _equal(saved, [v for _, _, v in _factors(pc2)]) and len(saved) == len(_factors(pc2))
    assert _amp_step(m2, pc2, opt, scaler, 4, dtype)  # and trains on
    assert all(torch.isfinite(p).all() for p in m2.parameters())


def test_scaled_gradients_are_refused():
    m = _net(dtype=torch.float32)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    pc = KFACPreconditioner(m, "kfac", grad_scaler=scaler)
    x, y = _data(0, dtype=torch.float32)
    scaler.scale(F.cross_entropy(m(x), y)).backward()
    before = _grads(m)
    with pytest.raises(RuntimeError, match=r"unscale_\(optimizer\)"):
        pc.step()
    assert _equal(before, _grads(m)) and pc.counters["steps"] == 0
    scaler.unscale_(opt)
    assert pc.step()


# ---------------------------------------------------------------------- non-finite
def test_nonfinite_gradient_changes_nothing_or_raises():
    m = _net()
    pc = KFACPreconditioner(m, "kfac", cov_every=1, inv_every=1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _train(m, pc, opt, 0, 2)
    saved, counters = [v.clone() for _, _, v in _factors(pc)], dict(pc.counters)
    x, y = _data(2)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    m[5].bias.grad[0] = float("nan")
    before = _grads(m)
    assert pc.step() is False
    after = _grads(m)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, after))
    assert pc.counters == dict(counters, skipped_steps=1, gradients=counters["gradients"] + 1)
    assert _equal(saved, [v for _, _, v in _factors(pc)])
    m2 = _net()
    strict = KFACPreconditioner(m2, "kfac", raise_on_nonfinite=True)
    F.cross_entropy(m2(x), y).backward()
    m2[0].weight.grad[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        strict.step()
    assert strict.counters["steps"] == 0 and not _factors(strict)


@pytest.mark.parametrize("strict", [False, True])
def test_nonfinite_directions_restore_the_factors(strict):
    """Finite gradients but a non-finite direction (a corrupted inverse): the statistics step's
    factor update is undone, .grad and the counters stay as they were (but skipped_steps)."""
    m = _net()
    pc = KFACPreconditioner(m, "kfac", cov_every=1, inv_every=100, raise_on_nonfinite=strict)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _train(m, pc, opt, 0, 2)
    pc.engine.state[m[5].weight]["kfac_A_inv"][0, 0] = float("inf")
    saved, counters = [(a, b, v.clone()) for a, b, v in _factors(pc)], dict(pc.counters)
    x, y = _data(2)
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    before = _grads(m)
    if strict:
        with pytest.raises(NonFiniteError, match="directions"):
            pc.step()
    else:
        assert pc.step() is False
    assert _equal(before, _grads(m))
    assert pc.counters == dict(counters, skipped_steps=counters["skipped_steps"] + (not strict))
    now = _factors(pc)
    assert [(a, b) for a, b, _ in saved] == [(a, b) for a, b, _ in now]
    assert all(torch.equal(u.nan_to_num(), v.nan_to_num()) for (_, _, u), (_, _, v) in zip(saved, now))


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("opt_name", sorted(TORCH_OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical(method, opt_name):
    """2N steps straight == N steps, torch.save of model + preconditioner + optimizer (+ LR
    scheduler), weights_only load into fresh objects, N more steps."""
    n = 3

    def make(m):
        opt = TORCH_OPTIMIZERS[opt_name](m.parameters())
        return KFACPreconditioner(m, method, **SETTINGS[method]), opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)

    m1 = _net()
    pc1, o1, s1 = make(m1)
    _train(m1, pc1, o1, 0, 2 * n, s1)

    m2 = _net()
    pc2, o2, s2 = make(m2)
    _train(m2, pc2, o2, 0, n, s2)
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "pc": pc2.state_dict(), "opt": o2.state_dict(), "sched": s2.state_dict()},
               buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    m3 = _net()
    m3.load_state_dict(ck["model"])
    pc3, o3, s3 = make(m3)
    pc3.load_state_dict(ck["pc"])
    o3.load_state_dict(ck["opt"])
    s3.load_state_dict(ck["sched"])
    _train(m3, pc3, o3, n, n, s3)
    assert _equal(m1.parameters(), m3.parameters())
    assert pc3.counters == pc1.counters
    _same_factors(pc1, pc3)


# ---------------------------------------------------------------------- arguments
BAD_ARGS = [
    (dict(method="natural"), ValueError, "invalid method"),
    (dict(damping=0.0), ValueError, "invalid damping"),
    (dict(damping=float("nan")), ValueError, "damping must not be NaN"),
    (dict(stat_decay=1.0), ValueError, "invalid stat_decay"),
    (dict(cov_every=0), ValueError, "invalid cov_every"),
    (dict(cov_every=1.5), TypeError, "cov_every must be an int"),
    (dict(inv_every=-1), ValueError, "invalid inv_every"),
    (dict(inverse="lu"), ValueError, "invalid inverse"),
    (dict(rank=2), TypeError, "rank is not a setting of method='kfac'"),
    (dict(lam_schedule="linear"), TypeError, "lam_schedule is not a setting of method='kfac'"),
    (dict(method="ifang", stat_decay=0.9), TypeError, "stat_decay is not a setting of method='ifang'"),
    (dict(method="ifang", rank=0), ValueError, "invalid rank"),
    (dict(method="ang", lam_schedule="step"), ValueError, "invalid lam_schedule"),
    (dict(method="ang", lam_schedule="linear"), ValueError, "total_steps is required"),
    (dict(method="ang", lam_rate=-1.0), ValueError, "invalid lam_rate"),
    (dict(kl_clip=1e-3), ValueError, "kl_clip needs lr="),
    (dict(kl_clip=-1.0, lr=0.1), ValueError, "invalid kl_clip"),
    (dict(kl_clip=1e-3, lr=-0.1), ValueError, "invalid lr"),
    (dict(accumulation_steps=0), ValueError, "invalid accumulation_steps"),
    (dict(accumulation_steps=2.0), TypeError, "accumulation_steps must be an int"),
    (dict(fused="yes"), TypeError, "fused must be None, True or False"),
    (dict(momentum=0.9), TypeError, "momentum is not a setting of KFACPreconditioner"),
    (dict(lr=0.1, weight_decay=1e-4), TypeError, "weight_decay is not a setting of KFACPreconditioner"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_ARGS, ids=[str(a[0]) for a in BAD_ARGS])
def test_bad_arguments_name_the_argument(kwargs, exc, match):
    m = _net()
    with pytest.raises(exc, match=match):
        KFACPreconditioner(m, **kwargs)
    assert not m._forward_pre_hooks and not m[0]._forward_hooks  # nothing left hooked


def test_bad_models():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        KFACPreconditioner([nn.Linear(2, 2).weight])
    class Scale(nn.Module):  # a bare parameter: no layer K-FAC knows
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="nothing to precondition"):
        KFACPreconditioner(Scale())


def test_settings_edited_between_steps_are_checked():
    m = _net()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    pc = KFACPreconditioner(m, "kfac", kl_clip=1e-3, lr=lambda: -1.0)
    x, y = _data(0)
    F.cross_entropy(m(x), y).backward()
    before = _grads(m)
    with pytest.raises(ValueError, match="invalid lr"):  # the callable's value, at step time
        pc.step()
    pc.lr = opt
    pc.param_groups[0]["damping"] = -1.0
    with pytest.raises(ValueError, match="invalid damping"):
        pc.step()
    assert _equal(before, _grads(m)) and pc.counters["steps"] == 0 and not _factors(pc)
    pc.param_groups[0]["damping"] = 1e-3
    assert pc.step()
    # lr= an optimizer whose groups give the preconditioned weights two lrs: refused, by name
    m2 = _net()
    two = torch.optim.SGD([{"params": m2[0].parameters()}, {"params": m2[5].parameters(), "lr": 0.5},
                           {"params": m2[1].parameters()}], lr=0.1)
    pc2 = KFACPreconditioner(m2, "kfac", kl_clip=1e-3, lr=two)
    F.cross_entropy(m2(x), y).backward()
    with pytest.raises(ValueError, match=r"lr: .* lrs \[0.1, 0.5\]"):
        pc2.step()


def test_load_state_dict_checks_everything_first():
    m = _net()
    pc = KFACPreconditioner(m, "kfac", cov_every=1, inv_every=1)
    _train(m, pc, torch.optim.SGD(m.parameters(), lr=0.1), 0, 2)
    good = pc.state_dict()
    fresh = KFACPreconditioner(_net(), "kfac", cov_every=1, inv_every=1)

    def variant(method="kfac", state=None, group=None):
        eng = dict(good["engine"])
        eng["state"] = {pid: dict(st) for pid, st in eng["state"].items()}
        eng["state"][0].update(state or {})
        eng["param_groups"] = [dict(g, **(group or {})) for g in eng["param_groups"]]
        return {"method": method, "engine": eng}

    cases = [(variant(method="ang"), "saved by method='ang'"),
             (variant(state={"kfac_A": torch.zeros(3, 3, dtype=torch.float64)}), r"state\['kfac_A'\] of parameter 0"),
             (variant(state={"kfac_G_inv": torch.full((4, 4), float("nan"), dtype=torch.float64)}),
              r"state\['kfac_G_inv'\] of parameter 0 is not finite"),
             (variant(group={"damping": 0.0}), "invalid damping"),
             ({"engine": good["engine"]}, "not a KFACPreconditioner state_dict")]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(sd)
        assert fresh.counters["steps"] == 0 and not _factors(fresh)
    with pytest.raises(ValueError, match="saved by method='kfac'"):
        KFACPreconditioner(_net(), "ifang").load_state_dict(good)
    fresh.load_state_dict(good)
    assert fresh.counters == pc.counters
    _same_factors(fresh, pc)


def test_hooks_lifecycle():
    """remove_hooks() unregisters everything (step then refuses); a deepcopy of the model carries
    no live hook; the preconditioner's hooks go when it is garbage collected."""
    import copy
    import gc

    m = _net()
    pc = KFACPreconditioner(m, "kfac")
    clone = copy.deepcopy(m)
    x, y = _data(0)
    F.cross_entropy(clone(x), y).backward()  # counted by nobody
    assert pc._forwards == 0
    pc.remove_hooks()
    assert not m._forward_pre_hooks and not m[0]._forward_hooks
    with pytest.raises(RuntimeError, match="no hooks"):
        pc.step()
    KFACPreconditioner(m, "kfac")
    gc.collect()
    assert not m._forward_pre_hooks and not m[0]._forward_hooks
