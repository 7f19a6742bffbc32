"""Rows for the K-FAC / ANG / IFANG ops, per layer size (out x in).

* kfac_factor_ema[OxI]: A <- b A + (1-b) s X^T X for a layer's activation rows X (M = 1024 rows):
  fused (addmm with the EMA folded in), reference (product, then scale/add), and the
  matmul floor (X^T X alone).
* kfac_inverse[OxI]: K-FAC's damped inverses of both factors (A: I x I, G: O x O) by Cholesky or
  eigh (torch.linalg) -- what a K-FAC iteration that refreshes inverses pays -- next to IFANG's
  whole preconditioning of the gradient by SMW (rank 1 and rank 8), which never inverts.
* kfac_precondition[OxI]: U = G^-1 T A^-1 with the ANG reductions: fused vs reference.
* kfac_smw_r1[OxI], kfac_smw_r8[OxI]: SMW apply with the reductions: fused vs reference.
* ang_combine: the slerp combine over the whole model's parameter list (as matrices): fused vs
  its foreach form (warm, cold, compiled) vs the per-tensor reference.
Every per-layer row with a fused kernel also has a 'compiled' row: torch.compile of its reference
(benchmarks.variants.compiled_case); the op's best_unfused is the faster of reference and compiled.
CPU rows use smaller layers than CUDA rows (a 4608 x 4608 eigh takes minutes on two cores).
bytes_per_param is 0 for the per-layer rows (their size is not the model's parameter count).
"""
import torch

from benchmarks.common import Case
from benchmarks.variants import COLD, compiled_case, op_cases
from natasha_ext import ops
from natasha_ext.ops import reference

SIZES = {"cpu": [(128, 1152), (512, 512)], "cuda": [(512, 4608), (2048, 2048)]}
LAM = 1e-3


def _dev(ts):
    return ts[0].device if ts else torch.device("cpu")


def _layer(dev, o, i, rank=1):
    g = torch.Generator().manual_seed(0)
    T = torch.randn(o, i, generator=g).to(dev)
    ya = torch.randn(rank, i, generator=g).to(dev) / i ** 0.5
    yg = torch.randn(rank, o, generator=g).to(dev) / o ** 0.5
    return T, ya, yg


def _spd(dev, n):
    x = torch.randn(n, n + 16, device=dev) / (n + 16) ** 0.5
    return x @ x.t()


def _ema(o, i, variant):
    def setup(ts):
        dev = _dev(ts)
        X = torch.randn(1024, i, device=dev)
        A = _spd(dev, i)
        if variant == "fused":
            return lambda: ops.kfac_factor_ema_([A], [X], [1 / 1024], 0.95, fused=True)
        if variant == "reference":
            return lambda: reference.kfac_factor_ema_([A], [X], [1 / 1024], 0.95)
        return lambda: torch.mm(X.t(), X)  # matmul floor
    return setup


def _inverse(o, i, variant):
    def setup(ts):
        dev = _dev(ts)
        A, G = _spd(dev, i), _spd(dev, o)
        eA, eG = torch.eye(i, device=dev), torch.eye(o, device=dev)
        if variant == "cholesky":
            return lambda: [torch.cholesky_inverse(torch.linalg.cholesky(F + LAM * e)) for F, e in ((A, eA), (G, eG))]
        if variant == "eigh":
            def f():
                out = []
                for F, e in ((A, eA), (G, eG)):
                    w, v = torch.linalg.eigh(F)
                    out.append((v / (w.clamp_min(0) + LAM)) @ v.t())
                return out
            return f
        rank = 1 if variant == "smw-rank1" else 8
        T, ya, yg = _layer(dev, o, i, rank)
        return lambda: ops.kfac_smw_apply([T], [ya], [yg], LAM)
    return setup


def _precondition(o, i, variant):
    def setup(ts):
        dev = _dev(ts)
        T = _layer(dev, o, i)[0]
        Gi, Ai = _spd(dev, o), _spd(dev, i)
        if variant == "fused":
            return lambda: ops.kfac_precondition([T], [Gi], [Ai], fused=True)
        if variant == "reference":
            return lambda: reference.kfac_precondition([T], [Gi], [Ai])
        return lambda: Gi @ T @ Ai  # the two products alone (floor)
    return setup


def _smw(o, i, rank, variant):
    def setup(ts):
        T, ya, yg = _layer(_dev(ts), o, i, rank)
        if variant == "fused":
            return lambda: ops.kfac_smw_apply([T], [ya], [yg], LAM, fused=True)
        return lambda: reference.kfac_smw_apply([T], [ya], [yg], [LAM])
    return setup


def _combine_inputs(ts):
    mats = [t.reshape(t.shape[0], -1) for t in ts]
    nat = [m * 0.5 + 0.1 for m in mats]
    return dict(nat=nat, mats=mats, red=reference._kfac_reductions(mats, nat, torch.float32, _dev(ts)),
                scale=torch.tensor(0.9, device=_dev(ts)))


def ang_combine_foreach(nat, mats, red, scale, lam, temps=COLD):
    c = reference.ang_coefficients(red, lam, False).to(torch.float32) * scale
    torch._foreach_mul_(nat, c[0, 0])
    torch._foreach_add_(nat, temps.new("mul", mats, c[0, 1]))


def _with_compiled(op, setup, floor, **kwargs):
    """fused, reference and compiled (of the reference) rows of a per-layer op, and its
    matmul-floor row when ``floor``; setup(variant) -> the row's set-up."""
    return ([Case(op, "fused", 0, setup("fused"), role="fused", **kwargs),
             Case(op, "reference", 0, setup("reference"), role="baseline", **kwargs),
             compiled_case(op, 0, setup("reference"), **kwargs)]
            + ([Case(op, "matmul-floor", 0, setup("matmul-floor"), **kwargs)] if floor else []))


def cases():
    out = []
    for dev, sizes in SIZES.items():
        for o, i in sizes:
            tag = f"[{o}x{i}]"
            out += _with_compiled(f"kfac_factor_ema{tag}", lambda v, o=o, i=i: _ema(o, i, v), True, devices=(dev,))
            out += [Case(f"kfac_inverse{tag}", v, 0, _inverse(o, i, v), devices=(dev,),
                         note="K-FAC refresh (both factors) vs IFANG's whole SMW apply")
                    for v in ("cholesky", "eigh", "smw-rank1", "smw-rank8")]
            out += _with_compiled(f"kfac_precondition{tag}", lambda v, o=o, i=i: _precondition(o, i, v), True,
                                  devices=(dev,))
            for r in (1, 8):
                out += _with_compiled(f"kfac_smw_r{r}{tag}", lambda v, o=o, i=i, r=r: _smw(o, i, r, v), False,
                                      devices=(dev,))
    out += op_cases("ang_combine", 12, _combine_inputs,
                    fused=lambda d: ops.ang_combine_(d["nat"], d["mats"], d["red"], d["scale"], 0.3, False,
                                                     fused=True),
                    form=lambda d, t: ang_combine_foreach(d["nat"], d["mats"], d["red"], d["scale"], 0.3, t),
                    reference=lambda d: reference.ang_combine_(d["nat"], d["mats"], d["red"], d["scale"], 0.3,
                                                               False))
    return out
