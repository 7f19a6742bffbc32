"""One case per public op of :mod:`natasha_ext.ops`: inputs for a list layout and a dtype, and a
runner that calls the op with ``fused=True`` or ``fused=False`` on fresh copies of them.

Every runner returns all tensors the op wrote or returned, so the comparison sees every output.
Ops are looked up in :mod:`natasha_ext.ops` at call time (a replaced function is what runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch

import natasha_ext.ops
from natasha_ext.precision import accumulation_dtype
from natasha_ext.selftest.compare import Runner
from natasha_ext.selftest.inputs import ALL_DTYPES, Filler, Shape, clones


def op(name: str):
    """The public op ``name`` as it is now (looked up per call)."""
    return getattr(natasha_ext.ops, name)


def group_size(shape: Shape) -> int:
    """AdaHessian's group of a tensor: its kernel size for conv-like shapes, else runs of 5
    (a block average whose last run is shorter)."""
    return math.prod(shape[2:]) if len(shape) >= 3 else 5


Builder = Callable[[Filler, torch.dtype, List[Shape], bool], Runner]


@dataclass(frozen=True)
class OpCase:
    op: str                      # function of natasha_ext.ops
    build: Builder               # (filler, dtype, shapes, noncontig) -> run(fused)
    matrices: bool = False       # takes (out, in) layer lists
    kind: str = "elementwise"    # tolerance kind (natasha_ext.selftest.tolerances)
    dtypes: Sequence[torch.dtype] = ALL_DTYPES


# ------------------------------------------------------------------------------ foundation
def rademacher(f: Filler, dtype, shapes, nc, seed=1234, offset=5) -> Runner:
    base = f.randns(shapes, dtype, noncontig=nc)        # overwritten: any values do

    def run(fused):
        ts = clones(base)
        op("rademacher_")(ts, seed=seed, offset=offset, fused=fused)
        return ts
    return run


def global_norm(f: Filler, dtype, shapes, nc) -> Runner:
    ts = f.randns(shapes, dtype, noncontig=nc)
    return lambda fused: [op("global_norm")(ts, fused=fused)]


# ------------------------------------------------------------------------------ natasha
def svrg_step(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    params, grads, snap = (f.randns(shapes, dtype, noncontig=nc) for _ in range(3))
    mu, anchor, center = (f.randns(shapes, acc) for _ in range(3))
    avg = f.randns(shapes, acc, scale=0.1)

    def run(fused):
        p, a, s = clones(params), clones(anchor), clones(avg)
        prox = op("svrg_step")(p, grads, a, s, lr=0.1, reg=0.5, snapshot_grads=snap, mu=mu, center=center,
                               prox_L=2.0, prox_radius=0.5, fused=fused)
        final = op("svrg_step")(p, grads, a, s, lr=0.05, reg=0.1, finalize=3, fused=fused)
        return p + a + s + [prox, final]
    return run


def oja_step(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    v = f.randns(shapes, acc, noncontig=nc)
    hv = f.randns(shapes, dtype, noncontig=nc)
    norm = math.sqrt(sum(float(t.double().square().sum()) for t in v))
    scale = torch.tensor(1.0 / norm, dtype=acc, device=f.device)

    def run(fused):
        w = clones(v)
        out = op("oja_step")(w, hv, scale, eta=0.1, fused=fused)
        return w + [out]
    return run


# ------------------------------------------------------------------------------ adahessian
def hutchinson_diag(f: Filler, dtype, shapes, nc) -> Runner:
    diag = f.randns(shapes, accumulation_dtype(dtype), noncontig=nc)
    hz = f.randns(shapes, dtype, noncontig=nc)

    def run(fused):
        d = clones(diag)
        op("hutchinson_diag_")(d, hz, seed=77, offset=3, fused=fused)
        op("hutchinson_diag_")(d, hz, seed=77, offset=9, alpha=0.5, accumulate=True, fused=fused)
        return d
    return run


def adahessian_step(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    params, grads, hz = (f.randns(shapes, dtype, noncontig=nc) for _ in range(3))
    m0 = f.randns(shapes, acc, scale=0.1, noncontig=nc)
    v0 = f.positives(shapes, acc, low=0.01, noncontig=nc)
    diag = f.randns(shapes, acc)
    groups = [group_size(s) for s in shapes]
    common = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-4, bias_correction1=1 - 0.9 ** 3,
                  bias_correction2=1 - 0.999 ** 3)

    def run(fused):
        p, m, v = clones(params), clones(m0), clones(v0)
        step = op("adahessian_step")
        step(p, grads, m, v, hz, groups, curv_mode=1, seed=5, offset=11, fused=fused, **common)
        step(p, grads, m, v, hz, groups, curv_mode=1, abs_first=False, seed=5, offset=13, weight_decay=0.01,
             hessian_power=0.5, fused=fused, **common)
        step(p, grads, m, v, diag, groups, curv_mode=2, fused=fused, **common)
        step(p, grads, m, v, [], groups, curv_mode=0, fused=fused, **common)
        return p + m + v
    return run


# ------------------------------------------------------------------------------ trust region
def tr_cg_init(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    grads = f.randns(shapes, dtype, noncontig=nc)
    v0 = f.positives(shapes, acc, low=0.0)
    garbage = [f.randns(shapes, acc) for _ in range(4)]   # a, s, r, p are overwritten

    def run(fused):
        v = clones(v0)
        outs = []
        for mode in ("spherical", "rmsprop", "adagrad"):
            a, s, r, p = (clones(g) for g in garbage)
            outs += a + s + r + p + [op("tr_cg_init_")(v, a, s, r, p, grads, beta=0.9, eps=1e-3, mode=mode,
                                                      fused=fused)]
        return v + outs
    return run


def cg_dots(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    p, r = f.randns(shapes, acc), f.randns(shapes, acc)
    a = f.positives(shapes, acc)
    bp = f.randns(shapes, dtype, noncontig=nc)
    return lambda fused: [op("cg_dots")(p, bp, r, a, fused=fused)]


def cg_step(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    s0, r0, p0 = (f.randns(shapes, acc) for _ in range(3))
    a = f.positives(shapes, acc)
    bp = f.randns(shapes, dtype, noncontig=nc)

    def run(fused):
        s, r, p = clones(s0), clones(r0), clones(p0)
        out = op("cg_step_")(s, r, p, bp, a, alpha=0.3, beta=0.7, fused=fused)
        return s + r + p + [out]
    return run


# ------------------------------------------------------------------------------ K-FAC / ANG
def kfac_factor_ema(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    rows = [f.randn((o + 2, i), dtype, noncontig=nc) for o, i in shapes]
    factors = [f.randn((i, i), acc) for _, i in shapes]
    scales = [1.0 / (o + 2) for o, _ in shapes]

    def run(fused):
        fs = clones(factors)
        op("kfac_factor_ema_")(fs, rows, scales=scales, decay=0.9, fused=fused)
        op("kfac_factor_ema_")(fs, rows, scales=scales, decay=0.0, fused=fused)
        return fs
    return run


def _square(f: Filler, n: int, acc) -> torch.Tensor:
    """A non-symmetric n x n matrix of O(1) gain: the ops' contract holds for any matrices."""
    return f.randn((n, n), acc, scale=1.0 / math.sqrt(max(n, 1)))


def kfac_precondition(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    grads = [f.randn(s, dtype, noncontig=nc) for s in shapes]
    g_inv = [_square(f, o, acc) for o, _ in shapes]
    a_inv = [_square(f, i, acc) for _, i in shapes]

    def run(fused):
        outs, red = op("kfac_precondition")(grads, g_inv, a_inv, fused=fused)
        return list(outs) + [red]
    return run


def kfac_smw_apply(f: Filler, dtype, shapes, nc, rank: int = 2) -> Runner:
    acc = accumulation_dtype(dtype)
    grads = [f.randn(s, dtype, noncontig=nc) for s in shapes]
    ya = [f.randn((rank, i), acc, scale=0.5) for _, i in shapes]
    yg = [f.randn((rank, o), acc, scale=0.5) for o, _ in shapes]
    damping = [0.05 + 0.01 * (j % 7) for j in range(len(shapes))]

    def run(fused):
        outs, red = op("kfac_smw_apply")(grads, ya, yg, damping=damping, fused=fused)
        return list(outs) + [red]
    return run


def ang_combine(f: Filler, dtype, shapes, nc) -> Runner:
    acc = accumulation_dtype(dtype)
    grads = [f.randn(s, dtype, noncontig=nc) for s in shapes]
    nat = [f.randn(s, dtype) for s in shapes]
    if len(nat) > 1:
        nat[1] = (-2 * grads[1].double()).to(dtype).contiguous()   # t^T G^-1 t < 0: eq. 7's fallback
    red = torch.stack([torch.stack([(t.double() * u.double()).sum(), u.double().square().sum(),
                                    t.double().square().sum()]) for t, u in zip(grads, nat)]).to(acc)
    scale = torch.tensor(0.8, dtype=acc, device=f.device)

    def run(fused):
        outs = []
        for lam in (0.0, 0.6, 1.0):
            for per_layer in (False, True):
                u = clones(nat)
                coef = op("ang_combine_")(u, grads, red, scale=scale, lam=lam, per_layer=per_layer, fused=fused)
                outs += u + [coef]
        return outs
    return run


OP_CASES: List[OpCase] = [
    OpCase("rademacher_", rademacher, kind="bitwise"),
    OpCase("global_norm", global_norm),
    OpCase("svrg_step", svrg_step),
    OpCase("oja_step", oja_step),
    OpCase("hutchinson_diag_", hutchinson_diag),
    OpCase("adahessian_step", adahessian_step),
    OpCase("tr_cg_init_", tr_cg_init),
    OpCase("cg_dots", cg_dots),
    OpCase("cg_step_", cg_step),
    OpCase("kfac_factor_ema_", kfac_factor_ema, matrices=True, kind="matmul"),
    OpCase("kfac_precondition", kfac_precondition, matrices=True, kind="matmul"),
    OpCase("kfac_smw_apply", kfac_smw_apply, matrices=True, kind="matmul"),
    OpCase("ang_combine_", ang_combine, matrices=True),
]

#: public functions of natasha_ext.ops that are thin forms of a checked op (not kernels of their own)
ALIASES = {"hutchinson_diag": "hutchinson_diag_"}
