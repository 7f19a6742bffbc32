"""svrg_step and oja_step: fused kernels against the pure-PyTorch reference (the spec)."""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import reference as R
from natasha_ext.precision import accumulation_dtype
from tests.helpers import devices, dtypes, elementwise_tol, list_shapes, requires_cuda, requires_fused


def _svrg_inputs(shapes, device, dtype, gen):
    mk = lambda s, dt: torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dt)
    acc = accumulation_dtype(dtype)
    return dict(params=[mk(s, dtype) for s in shapes], grads=[mk(s, dtype) for s in shapes],
                snap=[mk(s, dtype) for s in shapes], mu=[mk(s, acc) for s in shapes],
                anchor=[mk(s, acc) for s in shapes], avg=[mk(s, acc) for s in shapes],
                center=[mk(s, acc) for s in shapes])


def _clone(d):
    return {k: [t.clone() for t in v] for k, v in d.items()}


def _run_svrg(fused, d, snap, mu, center, finalize, radius):
    return ops.svrg_step(d["params"], d["grads"], d["anchor"], d["avg"], lr=0.05, reg=0.7,
                         snapshot_grads=d["snap"] if snap else None, mu=d["mu"] if mu else None,
                         finalize=finalize, center=d["center"] if center else None, prox_L=1.5,
                         prox_radius=radius, fused=fused)


@requires_fused
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["plain", "vr", "vr_finalize", "prox_shrink", "prox_inside", "prox_finalize",
                                  "finalize_no_mu"])
def test_svrg_step_fused_matches_reference(device, mode):
    snap = mu = mode.startswith("vr") or mode.startswith("prox")
    center = mode.startswith("prox")
    finalize = 3 if "finalize" in mode else 0
    if mode == "finalize_no_mu":
        snap, mu = True, False
    gen = torch.Generator().manual_seed(1)
    for dtype in dtypes(device, cpu_low=[torch.float16]):
        for shapes in list_shapes():
            d = _svrg_inputs(shapes, device, dtype, gen)
            n = sum(t.numel() for t in d["params"])
            # radius: well inside (the prox shrinks) or far outside (no shrink) of ||z - c|| ~ 1.4 sqrt(n)
            radius = 1e9 if mode == "prox_inside" else 0.3 * (n ** 0.5)
            a, b = _clone(d), _clone(d)
            out_f = _run_svrg(True, a, snap, mu, center, finalize, radius)
            out_r = _run_svrg(False, b, snap, mu, center, finalize, radius)
            tol = elementwise_tol(dtype)
            for k in ("params", "anchor", "avg"):
                for x, y in zip(a[k], b[k]):
                    torch.testing.assert_close(x, y, **tol, msg=lambda m: f"{mode} {dtype} {k}: {m}")
            torch.testing.assert_close(out_f.cpu(), out_r.cpu(), rtol=1e-4 if dtype != torch.float64 else 1e-11,
                                       atol=1e-4)
            if center and n > 100 and mode == "prox_shrink":
                assert out_f[2] < 1  # the shrink really happened
            if finalize:
                for x, y in zip(a["params"], a["anchor"]):
                    torch.testing.assert_close(x.to(y.dtype), y, **tol)
                assert all(bool((s == 0).all()) for s in a["avg"])


def test_svrg_step_reference_math():
    # d = g - gs + mu + reg (x - a); z = x - lr d; avg += x; finalize averages (avg + z)/m
    x, g, gs, mu, a, s = (torch.tensor([v], dtype=torch.float64) for v in (1.0, 2.0, 0.5, 0.25, 0.0, 3.0))
    out = R.svrg_step([x], [g], [gs], [mu], [a], [s], 0.1, 2.0, 0, None, 0.0, 0.0)
    d = 2.0 - 0.5 + 0.25 + 2.0 * 1.0
    assert x.item() == pytest.approx(1.0 - 0.1 * d) and s.item() == pytest.approx(4.0)
    assert out[0].item() == pytest.approx(d * d) and out[2].item() == 1.0
    # prox: ||z - c|| = 5 > r = 1 -> kappa = (1 + 2 lr L r / 5) / (1 + 2 lr L)
    x, g, a, s, c = (torch.tensor([v], dtype=torch.float64) for v in (5.0, 0.0, 5.0, 0.0, 0.0))
    out = R.svrg_step([x], [g], None, None, [a], [s], 0.5, 0.0, 0, [c], 2.0, 1.0)
    kappa = (1 + 2 * 0.5 * 2.0 * 1.0 / 5.0) / (1 + 2 * 0.5 * 2.0)
    assert out[2].item() == pytest.approx(kappa) and x.item() == pytest.approx(5.0 * kappa)
    # the prox is the minimiser of L max(0, |y| - r)^2 + (y - z)^2 / (2 lr)
    ys = torch.linspace(0, 6, 600001, dtype=torch.float64)
    obj = 2.0 * (ys.abs() - 1.0).clamp_min(0) ** 2 + (ys - 5.0) ** 2 / (2 * 0.5)
    assert ys[obj.argmin()].item() == pytest.approx(x.item(), abs=1e-4)


@requires_fused
@pytest.mark.parametrize("device", devices())
def test_oja_step_fused_matches_reference(device):
    gen = torch.Generator().manual_seed(2)
    for dtype in dtypes(device, cpu_low=[torch.float16]):
        acc = accumulation_dtype(dtype)
        for shapes in list_shapes():
            v = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=acc) for s in shapes]
            hv = [torch.randn(*s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
            scale = torch.tensor(0.37, dtype=acc, device=device)
            a, b = [t.clone() for t in v], [t.clone() for t in v]
            of = ops.oja_step(a, hv, scale, 0.3, fused=True)
            orf = ops.oja_step(b, hv, scale, 0.3, fused=False)
            tol = elementwise_tol(acc)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, **tol)
            torch.testing.assert_close(of.cpu(), orf.cpu(), rtol=1e-4 if acc == torch.float32 else 1e-11, atol=1e-5)


def test_oja_step_reference_math():
    w = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    hw = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    out = R.oja_step(w, hw, torch.tensor(0.2, dtype=torch.float64), 0.5)
    expect = 0.2 * (torch.tensor([3.0, 4.0]) - 0.5 * torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(w[0], expect.double())
    assert out[0].item() == pytest.approx(float(expect.norm()))
    assert out[1].item() == pytest.approx(0.04 * (3.0 - 8.0))


@requires_fused
def test_svrg_step_noncontiguous_params():
    base = torch.randn(6, 8, dtype=torch.float64)
    p = base.t()  # non-contiguous
    g = torch.randn(8, 6, dtype=torch.float64)
    a = torch.randn(8, 6, dtype=torch.float64)
    p_ref, s1, s2 = p.clone(), torch.zeros(8, 6, dtype=torch.float64), torch.zeros(8, 6, dtype=torch.float64)
    ops.svrg_step([p], [g], [a.clone()], [s1], lr=0.1, reg=0.5, fused=True)
    R.svrg_step([p_ref], [g], None, None, [a.clone()], [s2], 0.1, 0.5, 0, None, 0.0, 0.0)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(s1, s2)


def test_svrg_step_bad_arguments():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="grads"):
        ops.svrg_step(p, [torch.zeros(4)], [torch.zeros(3)], [torch.zeros(3)], lr=0.1, reg=0.0)
    with pytest.raises(ValueError, match="finalize"):
        ops.svrg_step(p, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], lr=0.1, reg=0.0, finalize=-1)
    with pytest.raises(TypeError, match="scale"):
        ops.oja_step([torch.zeros(3)], [torch.zeros(3)], 1.0, 0.1)


@requires_cuda
def test_natasha_ops_cuda_match_cpu_reference():
    gen = torch.Generator().manual_seed(3)
    shapes = [(1000,), (3, 70000), (17,)]
    d = _svrg_inputs(shapes, "cpu", torch.float32, gen)
    dc = {k: [t.cuda() for t in v] for k, v in d.items()}
    oc = _run_svrg(True, dc, True, True, True, 3, 10.0)
    orf = _run_svrg(False, d, True, True, True, 3, 10.0)
    for x, y in zip(dc["params"], d["params"]):
        torch.testing.assert_close(x.cpu(), y, rtol=4e-5, atol=4e-5)
    torch.testing.assert_close(oc.cpu(), orf, rtol=1e-4, atol=1e-4)


def test_benchmark_foreach_references_match_spec():
    from benchmarks.ops_natasha import oja_foreach, svrg_foreach

    gen = torch.Generator().manual_seed(4)
    shapes = [(7, 3), (100,), (2, 2, 2)]
    d = _svrg_inputs(shapes, "cpu", torch.float64, gen)
    a, b = _clone(d), _clone(d)
    out = svrg_foreach(a["params"], a["grads"], a["snap"], a["mu"], a["anchor"], a["avg"], 0.1, 0.4)
    ref = R.svrg_step(b["params"], b["grads"], b["snap"], b["mu"], b["anchor"], b["avg"], 0.1, 0.4, 0, None, 0.0, 0.0)
    for x, y in zip(a["params"] + a["avg"], b["params"] + b["avg"]):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(out, ref[0])
    w = [t.clone() for t in d["mu"]]
    w2 = [t.clone() for t in w]
    s = torch.tensor(0.5, dtype=torch.float64)
    torch.testing.assert_close(oja_foreach(w, d["grads"], s, 0.2), R.oja_step(w2, d["grads"], s, 0.2))


def test_svrg_step_prox_is_the_minimiser_over_the_whole_list():
    """The closed-form prox of L max(0, ||y - c|| - r)^2 uses the list-wide norm: at the result
    y the optimality condition 2 L (||y - c|| - r) (y - c)/||y - c|| + (y - z)/lr = 0 holds."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    mk = lambda: [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    x, g, c = mk(), mk(), mk()
    lr, L, r = 0.2, 3.0, 0.5
    z = [xi - lr * gi for xi, gi in zip(x, g)]
    anchor, avg = [t.clone() for t in x], [torch.zeros_like(t) for t in x]
    R.svrg_step(x, g, None, None, anchor, avg, lr, 0.0, 0, c, L, r)
    flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])
    y, zf, cf = flat(x), flat(z), flat(c)
    dist = float((y - cf).norm())
    assert dist > r  # far outside the radius: the shrink is active
    resid = 2 * L * (dist - r) * (y - cf) / dist + (y - zf) / lr
    assert float(resid.abs().max()) < 1e-10
    # inside the radius the prox is the identity
    x2 = [cf_.clone() + 1e-3 for cf_ in c]
    z2 = [t.clone() for t in x2]
    R.svrg_step(x2, [torch.zeros_like(t) for t in x2], None, None, [t.clone() for t in x2],
                [torch.zeros_like(t) for t in x2], lr, 0.0, 0, c, L, 10.0)
    for a, b_ in zip(x2, z2):
        assert torch.equal(a, b_)
