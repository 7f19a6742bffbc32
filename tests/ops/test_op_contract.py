"""One contract for the CPU and the CUDA kernel of each op, and one dispatch rule for the wrappers.

The first half pins the places where the two kernels of an op used to disagree (each CPU case
failed before the shared validators in csrc/include/natasha/args/; the CUDA half runs the same
case on a GPU). The second half pins the wrappers' rule: ``fused=True`` raises naming the op and
the reason the kernel cannot take the arguments, ``fused=None`` falls back to the reference and
says why once at DEBUG level, ``fused=False`` is the reference.
"""
from __future__ import annotations

import logging

import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import _dispatch, reference

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _device(name):
    if name == "cuda" and not (torch.cuda.is_available() and ops.fused_available("cuda")):
        pytest.skip("needs a CUDA device and the CUDA kernels (GPU machine)")
    return torch.device(name)


def _t(*shape, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


# ------------------------------------------------------------------ empty lists: neutral results
@pytest.mark.parametrize("device", DEVICES)
def test_oja_step_on_an_empty_list_returns_zeros(device):
    dev = _device(device)
    out = torch.ops.natasha.oja_step_([], [], torch.tensor(0.5, device=dev), eta=0.1)
    assert out.device.type == dev.type and out.dtype == torch.float32
    assert torch.equal(out.cpu(), torch.zeros(2))


@pytest.mark.parametrize("device", DEVICES)
def test_ang_combine_on_an_empty_list_returns_no_coefficients(device):
    dev = _device(device)
    red = torch.zeros(0, 3, device=dev, dtype=torch.float64)
    out = torch.ops.natasha.ang_combine_([], [], red, torch.tensor(1.0), lam=0.5, per_layer=False)
    assert out.shape == (0, 2) and out.dtype == torch.float64 and out.device.type == dev.type


# ------------------------------------------------------------------ scalars first, then lists
@pytest.mark.parametrize("device", DEVICES)
def test_tr_cg_init_checks_norm_mode_before_the_lists(device):
    dev = _device(device)
    state = [[_t(3, device=dev)] for _ in range(5)]
    with pytest.raises(RuntimeError, match="tr_cg_init_: norm_mode must be"):
        torch.ops.natasha.tr_cg_init_(*state, [], beta=0.9, eps=1e-8, norm_mode=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["tr_cg_init_", "cg_dots", "cg_step_"])
def test_cg_ops_refuse_an_empty_input_list_beside_state(device, op):
    """An empty grads/Bp beside non-empty state lists is a length error, not a zero result."""
    dev = _device(device)
    x = [_t(3, device=dev)]
    calls = {"tr_cg_init_": lambda: torch.ops.natasha.tr_cg_init_(x, x, x, x, x, [], beta=0.9, eps=1e-8, norm_mode=1),
             "cg_dots": lambda: torch.ops.natasha.cg_dots(x, [], x, x),
             "cg_step_": lambda: torch.ops.natasha.cg_step_(x, x, x, [], x, alpha=0.1, beta=0.2)}
    with pytest.raises(RuntimeError, match=f"{op}: .* has 1 tensors but (grads|Bp) has 0"):
        calls[op]()


# ------------------------------------------------------------------ ang_combine_ reductions dtype
@pytest.mark.parametrize("device", DEVICES)
def test_ang_combine_refuses_integer_reductions(device):
    dev = _device(device)
    nat, grads = [_t(3, 4, device=dev)], [_t(3, 4, device=dev, seed=1)]
    with pytest.raises(RuntimeError, match="ang_combine_: reductions has dtype"):
        torch.ops.natasha.ang_combine_(nat, grads, torch.ones(1, 3, dtype=torch.int64, device=dev),
                                       torch.tensor(1.0), lam=0.5, per_layer=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("red_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ang_combine_takes_reductions_of_every_float_dtype(device, red_dtype):
    dev = _device(device)
    nat = [_t(3, 4, device=dev), _t(2, 5, device=dev, seed=2)]
    grads = [_t(3, 4, device=dev, seed=1), _t(2, 5, device=dev, seed=3)]
    red = torch.stack([torch.stack([(t * u).sum(), u.square().sum(), t.square().sum()])
                       for t, u in zip(grads, nat)]).to(red_dtype)
    want = [u.clone() for u in nat]
    scale = torch.tensor(0.7, device=dev)
    coef_ref = reference.ang_combine_(want, grads, red, scale, 0.3, True)
    coef = torch.ops.natasha.ang_combine_(nat, grads, red, scale, lam=0.3, per_layer=True)
    assert coef.dtype == red_dtype
    torch.testing.assert_close(coef.double(), coef_ref.double(), rtol=1e-6, atol=0)
    for u, w in zip(nat, want):
        torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ mixed-dtype lists
@pytest.mark.parametrize("device", DEVICES)
def test_rademacher_and_global_norm_take_mixed_dtype_lists(device):
    dev = _device(device)
    dts = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.float32]
    sizes = [300, 129, 1, 0, 70000]
    ts = [torch.empty(n, dtype=dt, device=dev) for n, dt in zip(sizes, dts)]
    torch.ops.natasha.rademacher_(ts, seed=11, offset=3)
    want = [torch.empty(n, dtype=dt, device=dev) for n, dt in zip(sizes, dts)]
    reference.rademacher_(want, 11, 3)
    for a, b in zip(ts, want):
        assert torch.equal(a, b)
    xs = [_t(n, device=dev, dtype=dt, seed=i) for i, (n, dt) in enumerate(zip(sizes, dts))]
    for order in (xs, xs[::-1]):  # fp32 then fp64 accumulation
        got = torch.ops.natasha.global_norm(order)
        torch.testing.assert_close(got, reference.global_norm(order), rtol=1e-5, atol=0)


# ------------------------------------------------------------------ the dispatch rule
F8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.skipif(F8 is None, reason="no float8 dtype in this torch")
def test_float8_takes_the_reference_under_fused_none_and_raises_under_fused_true(caplog):
    xs = [torch.ones(5).to(F8), torch.ones(3).to(F8)]
    _dispatch._logged.clear()
    with caplog.at_level(logging.DEBUG, logger="natasha_ext.ops"):
        for _ in range(3):
            assert float(ops.global_norm(xs)) == pytest.approx(8 ** 0.5)
            ops.rademacher_(xs, 1, 0)
    msgs = [r.getMessage() for r in caplog.records if r.name == "natasha_ext.ops"]
    assert len([m for m in msgs if m.startswith("global_norm:")]) == 1, msgs  # once, not per call
    assert len([m for m in msgs if m.startswith("rademacher_:")]) == 1, msgs
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "natasha_ext.ops")
    assert "float8" in msgs[0]
    with pytest.raises(RuntimeError, match=r"global_norm\(fused=True\).*float8"):
        ops.global_norm(xs, fused=True)
    with pytest.raises(RuntimeError, match=r"rademacher_\(fused=True\).*float8"):
        ops.rademacher_(xs, 1, 0, fused=True)


def test_fused_true_raises_where_kfac_used_to_fall_back_silently():
    factors = [torch.eye(6, dtype=torch.float64)[::2, ::2]]  # a strided view: not contiguous
    rows = [_t(3, 3, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match=r"kfac_factor_ema_\(fused=True\).*factors\[0\] is not contiguous"):
        ops.kfac_factor_ema_(factors, rows, [1.0], 0.5, fused=True)
    ops.kfac_factor_ema_(factors, rows, [1.0], 0.5)  # fused=None: the reference, same answer
    want = 0.5 * torch.eye(3, dtype=torch.float64) + 0.5 * rows[0].T @ rows[0]
    torch.testing.assert_close(factors[0], want)


def test_fused_true_raises_where_adahessian_used_to_fall_back_silently():
    p, g = [_t(4)], [_t(4, seed=1)]
    m, v = [torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)]  # exp_avg of the wrong dtype
    kw = dict(curv_mode=0, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1, bias_correction2=0.001)
    with pytest.raises(RuntimeError, match=r"adahessian_step_\(fused=True\).*exp_avg\[0\] has dtype torch.float64"):
        ops.adahessian_step(p, g, m, v, [], [1], fused=True, **kw)
    before = p[0].clone()
    ops.adahessian_step(p, g, m, v, [], [1], **kw)  # fused=None: the reference
    assert not torch.equal(p[0], before)


def test_fused_false_never_calls_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.ops.natasha, "global_norm", lambda *a, **k: calls.append(a))
    ops.global_norm([torch.ones(3)], fused=False)
    assert calls == []
    ops.global_norm([torch.ones(3)], fused=True)
    assert len(calls) == 1


def test_old_and_new_names_are_the_same_functions():
    assert ops.svrg_step is ops.svrg_step_ and ops.oja_step is ops.oja_step_
    assert ops.adahessian_step is ops.adahessian_step_


# ------------------------------------------------------------------ device guard (issue 13)
@pytest.mark.cuda
def test_second_stage_kernels_run_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every launch (first and second stage) must go to
    cuda:1 (each CUDA op guards its device at entry)."""
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and ops.fused_available("cuda")):
        pytest.skip("needs two CUDA devices and the CUDA kernels")
    dev = torch.device("cuda:1")
    with torch.cuda.device(0):
        xs = [_t(70000, device=dev), _t(33, device=dev, seed=1)]
        torch.testing.assert_close(ops.global_norm(xs, fused=True), reference.global_norm(xs))
        v, hv = [_t(5000, device=dev)], [_t(5000, device=dev, seed=2)]
        v2 = [v[0].clone()]
        out = ops.oja_step_(v, hv, torch.tensor(0.5, device=dev), 0.1, fused=True)
        want = reference.oja_step(v2, hv, torch.tensor(0.5, device=dev), 0.1)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(v[0], v2[0])
