"""Trust-region ops: the reference against hand-written math, and fused against reference."""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import reference
from tests.helpers import devices, elementwise_tol

requires_tr_kernels = pytest.mark.skipif(not ops.fused_available(),
                                         reason="trust-region kernels not built")
pytestmark = pytest.mark.usefixtures("one_thread")


def _lists(sizes, dtype, device="cpu", seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.randn(n, generator=g, dtype=torch.float64)
        out.append((t.abs() + 0.1 if positive else t).to(dtype).to(device))
    return out


SIZES = {"empty": [0], "one": [1], "small": [22], "mixed": [4097, 0, 3, 65537], "many": [7] * 57 + [130] * 60}


def test_reference_math_matches_flat_formulas():
    sizes = [5, 9]
    s, r, p, Bp = (_lists(sizes, torch.float64, seed=i) for i in range(4))
    a = _lists(sizes, torch.float64, seed=9, positive=True)
    cat = lambda ts: torch.cat(ts)
    S, R, P, BP, A = map(cat, (s, r, p, Bp, a))
    dots = reference.cg_dots(p, Bp, r, a)
    torch.testing.assert_close(dots, torch.stack([P @ BP, R @ P, R @ (BP / A), BP @ (BP / A)]))
    alpha, beta = 0.3, 0.7
    out = reference.cg_step_(s, r, p, Bp, a, alpha, beta)
    S2, R2 = S + alpha * P, R + alpha * BP
    P2 = -R2 / A + beta * P
    torch.testing.assert_close(cat(s), S2)
    torch.testing.assert_close(cat(r), R2)
    torch.testing.assert_close(cat(p), P2)
    torch.testing.assert_close(out, torch.stack([R2 @ (R2 / A), S2 @ (A * S2), S2 @ (A * P2), P2 @ (A * P2)]))


@pytest.mark.parametrize("mode", ["spherical", "rmsprop", "adagrad"])
def test_reference_init_modes(mode):
    sizes = [4, 6]
    g = _lists(sizes, torch.float64, seed=1)
    v = _lists(sizes, torch.float64, seed=2, positive=True)
    v0 = torch.cat(v).clone()
    a, s, r, p = ([torch.full((n,), 7.0, dtype=torch.float64) for n in sizes] for _ in range(4))
    out = reference.tr_cg_init_(v, a, s, r, p, g, 0.8, 1e-3, ops.trust_region.TR_MODES[mode])
    G = torch.cat(g)
    V = {"spherical": v0, "rmsprop": 0.8 * v0 + 0.2 * G * G, "adagrad": v0 + G * G}[mode]
    A = torch.ones_like(G) if mode == "spherical" else V + 1e-3
    torch.testing.assert_close(torch.cat(v), V)
    torch.testing.assert_close(torch.cat(a), A)
    assert torch.cat(s).eq(0).all()
    torch.testing.assert_close(torch.cat(r), G)
    torch.testing.assert_close(torch.cat(p), -G / A)
    torch.testing.assert_close(out, torch.stack([G @ (G / A), G @ G]))


def _pairs(sizes, state_dtype, in_dtype, device):
    """Two identical sets (fused, reference) of (s, r, p, Bp, a, v, g)."""
    base = dict(s=_lists(sizes, state_dtype, device, 1), r=_lists(sizes, state_dtype, device, 2),
                p=_lists(sizes, state_dtype, device, 3), Bp=_lists(sizes, in_dtype, device, 4),
                a=_lists(sizes, state_dtype, device, 5, positive=True),
                v=_lists(sizes, state_dtype, device, 6, positive=True), g=_lists(sizes, in_dtype, device, 7))
    clone = lambda d: {k: [t.clone() for t in ts] for k, ts in d.items()}
    return clone(base), clone(base)


DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.bfloat16)]


@requires_tr_kernels
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "fp64", "bf16-in"])
def test_fused_matches_reference(device, sizes, dtypes):
    sd, idt = dtypes
    f, R = _pairs(sizes, sd, idt, device)
    tol = elementwise_tol(sd)
    for mode in ("spherical", "rmsprop", "adagrad"):
        of = ops.tr_cg_init_(f["v"], f["a"], f["s"], f["r"], f["p"], f["g"], 0.8, 1e-3, mode, fused=True)
        orf = reference.tr_cg_init_(R["v"], R["a"], R["s"], R["r"], R["p"], R["g"], 0.8, 1e-3,
                                    ops.trust_region.TR_MODES[mode])
        torch.testing.assert_close(of, orf, **tol)
        for k in ("v", "a", "s", "r", "p"):
            for x, y in zip(f[k], R[k]):
                torch.testing.assert_close(x, y, **tol)
    df = ops.cg_dots(f["p"], f["Bp"], f["r"], f["a"], fused=True)
    dr = reference.cg_dots(R["p"], R["Bp"], R["r"], R["a"])
    torch.testing.assert_close(df, dr, **tol)
    of = ops.cg_step_(f["s"], f["r"], f["p"], f["Bp"], f["a"], 0.37, 0.61, fused=True)
    orf = reference.cg_step_(R["s"], R["r"], R["p"], R["Bp"], R["a"], 0.37, 0.61)
    torch.testing.assert_close(of, orf, **tol)
    for k in ("s", "r", "p"):
        for x, y in zip(f[k], R[k]):
            torch.testing.assert_close(x, y, **tol)


@requires_tr_kernels
def test_fused_is_deterministic_and_checks_arguments():
    f, _ = _pairs([70000, 5], torch.float32, torch.float32, "cpu")
    d1 = ops.cg_dots(f["p"], f["Bp"], f["r"], f["a"], fused=True)
    d2 = ops.cg_dots(f["p"], f["Bp"], f["r"], f["a"], fused=True)
    assert torch.equal(d1, d2)
    with pytest.raises((RuntimeError, ValueError), match="Bp"):
        ops.cg_dots(f["p"], f["Bp"][:1], f["r"], f["a"], fused=True)
    with pytest.raises(RuntimeError):
        torch.ops.natasha.cg_dots(f["p"], f["Bp"], f["r"], [t[:3] for t in f["a"]])


def test_dispatch_falls_back_for_non_contiguous_and_mixed_dtypes():
    x = [torch.randn(6, 4, dtype=torch.float64).t()]  # non-contiguous
    p, Bp, r, a = [t.clone().t().contiguous().t() for t in x], x, x, [torch.ones(6, 4, dtype=torch.float64).t()]
    out = ops.cg_dots(p, Bp, r, a)
    torch.testing.assert_close(out, reference.cg_dots(p, Bp, r, a))
    with pytest.raises(ValueError, match="mode"):
        ops.tr_cg_init_(a, a, a, a, a, a, 0.8, 1e-8, "nope")


@requires_tr_kernels
def test_fused_accepts_strided_gradients_and_products():
    """Autograd may return strided gradients (conv weights): read-only inputs are made dense,
    so fused=True (what an optimizer resolves to) still runs the kernel and matches."""
    f, r_ = _pairs([6 * 4, 5], torch.float32, torch.float32, "cpu")
    strided = [torch.randn(4, 6).t(), torch.randn(5)]
    shaped = lambda ts: [t.view(6, 4) if t.numel() == 24 else t for t in ts]
    p, rr, a = shaped(f["p"]), shaped(f["r"]), shaped(f["a"])
    out = ops.cg_dots(p, strided, rr, a, fused=True)
    torch.testing.assert_close(out, reference.cg_dots(p, strided, rr, a), rtol=1e-5, atol=1e-6)
