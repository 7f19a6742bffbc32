"""torch.optim conformity of every optimizer in tests/suites/optimizer_zoo.py: param groups, frozen and
unused parameters, zero_grad, bit-identical checkpoint resume through torch.save /
torch.load(weights_only=True) into a fresh model and optimizer, LR schedulers, deepcopy, pickle,
fused=True/None/False, and bad input (hyperparameters, sparse gradients, complex parameters,
mixed devices/dtypes, closures that break the convention)."""
import copy
import inspect
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from natasha_ext import _backend, ops
from tests.suites.optimizer_zoo import ZOO, Problem, case_params, flat_params, resumed_run, roundtrip, state_tensors


def assert_same(a, b, path="state"):
    """Recursive bit-exact equality of state dicts (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(7.5), b.nan_to_num(7.5))), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _layers(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def _groups(case, model, second=None):
    """Two param groups (first / last layer); the second may override hyperparameters."""
    l0, l2 = _layers(model)
    return [{"params": list(l0.parameters())}, dict({"params": list(l2.parameters())}, **(second or {}))]


# ---------------------------------------------------------------------------- checkpoints
@case_params()
def test_resume_is_bit_identical(case):
    """2N steps == N steps + torch.save/torch.load(weights_only=True) into a FRESH model and
    optimizer (other init, other seed) + N steps."""
    pb, n = Problem(), case.resume_steps
    m_ref, o_ref, m2, o2 = resumed_run(case, pb, n, init_seed=123, opt_seed=98765)

    assert torch.equal(flat_params(m_ref), flat_params(m2))
    assert_same(o_ref.state_dict(), o2.state_dict())
    assert o2.rng.state_dict() == o_ref.rng.state_dict()


@case_params()
def test_state_dict_is_weights_only_loadable_and_idempotent(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 2)
    sd = o.state_dict()
    loaded = roundtrip(sd)
    assert_same(sd, loaded)
    o.load_state_dict(loaded)  # loading into the same optimizer changes nothing
    assert_same(sd, o.state_dict())


# ---------------------------------------------------------------------------- param groups
@case_params()
def test_param_groups_read_per_group(case):
    pb = Problem()
    runs = {}
    variants = {"same": {}}
    if case.group_key is not None:
        base = case.kwargs.get(case.group_key)
        if base is None:
            base = inspect.signature(case.klass.__init__).parameters[case.group_key].default
        variants["other"] = {case.group_key: case.group_value if case.group_value is not None else 2 * base}
    for name, second in variants.items():
        m = pb.model()
        o = case.make(m, params=_groups(case, m, second))
        assert len(o.param_groups) == 2
        if second:
            assert o.param_groups[1][case.group_key] == second[case.group_key]
            assert set(o.param_groups[0]) == set(o.param_groups[1])
        before = flat_params(m)
        case.run(pb, m, o, 0, 6)
        l0, l2 = _layers(m)
        assert not torch.equal(l0.weight.detach().double().flatten(), before[:l0.weight.numel()]), "group 0 never moved"
        runs[name] = [p.detach().clone() for p in l2.parameters()]
        assert all(torch.isfinite(p).all() for p in m.parameters())
    if "other" in runs:  # the second group's hyperparameter is read: its parameters end elsewhere
        assert any(not torch.equal(a, b) for a, b in zip(runs["same"], runs["other"]))


@case_params()
def test_add_param_group(case):
    pb = Problem()
    m = pb.model()
    l0, l2 = _layers(m)
    o = case.make(m, params=list(l0.parameters()))
    case.run(pb, m, o, 0, 2)
    w2 = l2.weight.detach().clone()
    o.add_param_group({"params": list(l2.parameters())})
    assert set(o.param_groups[1]) == set(o.param_groups[0])  # defaults filled in
    rejected = o.counters.get("rejected", 0)
    case.run(pb, m, o, 2, 6)
    # the new group moves (trust-region methods may legitimately reject all 4 steps)
    assert not torch.equal(w2, l2.weight.detach()) or o.counters.get("rejected", 0) - rejected == 4
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # a parameter cannot be in two groups
    with pytest.raises(ValueError):
        o.add_param_group({"params": [l0.weight]})


@case_params()
def test_frozen_parameters_are_skipped(case):
    """requires_grad=False parameters in the optimizer never move, get no state and no .grad."""
    pb = Problem()
    m = pb.model()
    l0, l2 = _layers(m)
    l2.bias.requires_grad_(False)
    frozen0 = l2.bias.detach().clone()
    o = case.make(m, params=list(m.parameters()))
    case.run(pb, m, o, 0, 6)
    assert torch.equal(l2.bias.detach(), frozen0)
    assert not o.state.get(l2.bias), "frozen parameter got optimizer state"
    assert l2.bias.grad is None
    assert not torch.equal(l0.weight.detach(), pb.model().state_dict()["0.weight"])


# Cases whose optimizer still moves a parameter the loss does not reach (torch.optim skips
# parameters whose .grad is None). The shared engines zero-fill such gradients and report their
# indices (curvature.hvp.gradients(unused=...), HVP.unused); Natasha2 keeps them out of Oja's vector.
UNUSED_MOVES = {}


@case_params()
def test_parameters_the_loss_does_not_reach_are_untouched(case):
    if case.name in UNUSED_MOVES:
        pytest.xfail(UNUSED_MOVES[case.name])
    pb = Problem()
    m = pb.model()
    unused = nn.Parameter(torch.randn(4))
    unused0 = unused.detach().clone()
    o = case.make(m, params=list(m.parameters()) + [unused])
    case.run(pb, m, o, 0, 6)
    # an average of identical iterates may round by an ulp (Natasha's fused sub-epoch average)
    torch.testing.assert_close(unused.detach(), unused0, rtol=4e-7, atol=0)


@case_params()
def test_zero_grad_and_no_graph_left_in_grad(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 2)
    for p in m.parameters():  # step(closure) never leaves a graph behind in .grad
        assert p.grad is None or p.grad.grad_fn is None
    loss = case.closure(pb, m, 0)()
    (loss[0] if isinstance(loss, tuple) else loss).backward()
    o.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    o.zero_grad()
    assert all(p.grad is None for p in m.parameters())


# ---------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[g["lr"] for g in o.param_groups], total_steps=8,
        cycle_momentum=any("momentum" in g or "betas" in g for g in o.param_groups)),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@case_params()
def test_lr_schedulers(case, sched):
    if case.lr_key is None:
        pytest.skip(f"{case.cls} has no learning rate (radius / sigma adapt from rho)")
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    s = SCHEDULERS[sched](o)
    seen = []
    for i in range(6):
        seen.append([{k: g[k] for k in ("lr", "momentum", "betas") if k in g} for g in o.param_groups])
        case.run(pb, m, o, i, i + 1)
        s.step()
    assert len({repr(x) for x in seen}) > 1, "the scheduler changed nothing"
    # the same hyperparameters set by hand give the same run: the optimizer reads the groups each step
    m2 = pb.model()
    o2 = case.make(m2)
    for i in range(6):
        for g, hp in zip(o2.param_groups, seen[i]):
            g.update(hp)
        case.run(pb, m2, o2, i, i + 1)
    assert torch.equal(flat_params(m), flat_params(m2))
    # ... and they matter
    m3 = pb.model()
    o3 = case.make(m3)
    case.run(pb, m3, o3, 0, 6)
    assert not torch.equal(flat_params(m), flat_params(m3))


# ---------------------------------------------------------------------------- copies
def _reattach(opt, model):
    if hasattr(opt, "attach"):  # K-FAC family: hooks do not travel with copies
        opt.attach(model)


@case_params()
def test_deepcopy(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 2)
    m2, o2 = copy.deepcopy((m, o))
    _reattach(o2, m2)
    assert_same(o.state_dict(), o2.state_dict())
    case.run(pb, m, o, 2, 5)
    case.run(pb, m2, o2, 2, 5)
    assert torch.equal(flat_params(m), flat_params(m2))
    assert_same(o.state_dict(), o2.state_dict())
    copy.deepcopy(o)  # the optimizer alone copies too


@case_params()
def test_pickle(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 2)
    o2 = pickle.loads(pickle.dumps(o))
    assert_same(o.state_dict(), o2.state_dict())
    assert_same(o.counters, o2.counters)
    assert o2.rng.state_dict() == o.rng.state_dict()


# ---------------------------------------------------------------------------- fused
@case_params()
def test_fused_true_without_kernels_is_a_clear_error(case, monkeypatch):
    monkeypatch.setattr(_backend, "FUSED_DEVICES", frozenset())
    monkeypatch.setattr(_backend, "LOAD_ERROR", "simulated: natasha_ext._C missing")
    pb = Problem()
    with pytest.raises(RuntimeError, match="fused=True"):
        case.make(pb.model(), fused=True)
    m = pb.model()
    o = case.make(m, fused=None)
    assert o.fused is None  # the request is kept; the ops fall back call by call
    with KernelCalls() as seen:
        case.run(pb, m, o, 0, 2)
    assert not seen.ops
    with pytest.raises(TypeError, match="fused"):
        case.make(pb.model(), fused="yes")


class KernelCalls(TorchDispatchMode):
    """Records the natasha:: kernels dispatched while active (the reference path calls none)."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "natasha":
            self.ops.add(func.__name__)
        return func(*args, **(kwargs or {}))


@case_params()
def test_fused_none_picks_the_kernels(case):
    pb = Problem()
    for fused in (None, False):
        m = pb.model()
        o = case.make(m, fused=fused)
        assert o.fused is fused
        with KernelCalls() as seen:
            case.run(pb, m, o, 0, 2)
        assert bool(seen.ops) == (fused is None and ops.fused_available("cpu")), (fused, seen.ops)


@pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")
@case_params()
def test_fused_matches_reference_over_steps(case):
    pb = Problem(dtype=torch.float64)
    out = {}
    for fused in (True, False):
        m = pb.model()
        o = case.make(m, fused=fused)
        assert o.fused is fused
        case.run(pb, m, o, 0, 5)
        out[fused] = (flat_params(m), o)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-8, atol=1e-10)
    for a, b in zip(state_tensors(out[True][1]), state_tensors(out[False][1])):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, equal_nan=True)
        else:
            assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@case_params()
def test_cuda_training_matches_cpu(case):
    """The same fp64 run on CUDA (fused where the kernels exist) and on CPU: the parameters agree
    to round-off, and the Philox draws (probes, Oja start vectors, kick signs) are the same."""
    runs = {}
    for device in ("cpu", "cuda"):
        pb = Problem(dtype=torch.float64, device=device)
        m = pb.model()
        o = case.make(m)
        case.run(pb, m, o, 0, 5)
        runs[device] = (flat_params(m).cpu(), o.rng.state_dict(), dict(o.counters))
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], rtol=1e-7, atol=1e-9)
    assert runs["cuda"][1] == runs["cpu"][1]


# ---------------------------------------------------------------------------- bad input
BAD = [(c, arg, val) for c in ZOO for arg, val in c.bad]


@pytest.mark.parametrize("case,arg,value", BAD, ids=[f"{c.name}-{a}={v!r}" for c, a, v in BAD])
def test_bad_hyperparameters_name_the_argument(case, arg, value):
    with pytest.raises((ValueError, TypeError)) as info:
        case.make(Problem().model(), **{arg: value})
    assert arg.split("[")[0] in str(info.value), str(info.value)


@case_params([c for c in ZOO if c.lr_key])
def test_bad_lr(case):
    for value in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            case.make(Problem().model(), lr=value)
    with pytest.raises(TypeError, match="lr"):
        case.make(Problem().model(), lr="0.1")


class _EmbedNet(nn.Module):
    def __init__(self, sparse):
        super().__init__()
        self.emb = nn.Embedding(10, 5, sparse=sparse)
        self.lin = nn.Linear(5, 3)

    def forward(self, idx):
        return self.lin(self.emb(idx))


@case_params()
def test_sparse_gradients_are_refused(case):
    net = _EmbedNet(sparse=True)
    idx, y = torch.tensor([1, 2, 3, 2]), torch.randn(4, 3)
    o = case.make(net)
    closure = lambda: (lambda out: (F.mse_loss(out, y), out) if case.outputs else F.mse_loss(out, y))(net(idx))
    w0 = net.emb.weight.detach().clone()
    with pytest.raises((RuntimeError, TypeError, ValueError), match="sparse"):
        o.step(closure)
    assert torch.equal(net.emb.weight.detach(), w0)


@case_params()
def test_complex_parameters_are_refused(case):
    m = nn.Sequential(nn.Linear(3, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        case.make(m)


@case_params()
def test_mixed_devices_are_refused(case):
    m = Problem().model()
    _layers(m)[1].to("meta")  # 'meta' stands in for a second device
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        case.make(m)


class _Cast(nn.Module):
    def forward(self, x):
        return x.double()


@case_params()
def test_mixed_dtypes_work_or_are_refused_clearly(case):
    """fp32 and fp64 parameters in one optimizer: either both train (state in each param's
    precision, finite) or the error says 'dtype'."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), _Cast(), nn.Linear(8, 3).double())
    x, y = torch.randn(16, 5), torch.randn(16, 3, dtype=torch.float64)

    def closure():
        out = m(x)
        loss = F.mse_loss(out, y)
        return (loss, out) if case.outputs else loss

    try:
        o = case.make(m)
        for _ in range(4):
            o.step(closure)
    except (ValueError, TypeError, RuntimeError) as exc:
        assert "dtype" in str(exc).lower(), f"unclear error for mixed dtypes: {exc}"
        return
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert m[0].weight.dtype == torch.float32 and m[3].weight.dtype == torch.float64
    for p in m.parameters():
        for v in o.state[p].values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape:
                assert v.dtype in (torch.float32, torch.float64)
                assert torch.isfinite(v).all()


@case_params()
def test_missing_closure(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    before = flat_params(m)
    try:
        out = o.step()
    except RuntimeError as exc:
        assert "closure" in str(exc)
    else:  # backward-then-step mode (AdaHessian, K-FAC): no gradients -> nothing happens
        assert out is None
        assert torch.equal(before, flat_params(m))


@case_params()
def test_closure_returning_non_scalar(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    x, _ = pb.batch(0)
    bad = (lambda: (m(x).sum(1), m(x))) if case.outputs else (lambda: m(x))
    before = flat_params(m)
    with pytest.raises(ValueError, match="scalar"):
        o.step(bad)
    assert torch.equal(before, flat_params(m))


@case_params()
def test_closure_returning_tensor_without_grad_fn(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    good = case.closure(pb, m, 0)

    def detached():
        out = good()
        return (out[0].detach(), out[1].detach()) if isinstance(out, tuple) else out.detach()

    with pytest.raises(ValueError, match="grad_fn|autograd"):
        o.step(detached)
    with pytest.raises(TypeError, match="Tensor|tuple|return"):
        o.step(lambda: 1.0)
