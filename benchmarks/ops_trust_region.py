"""Rows for the trust-region ops: one Steihaug-CG iteration's vector work (cg_dots + cg_step_),
and the ellipsoid update fused with the CG start (tr_cg_init_), each against its torch._foreach_*
form (warm, cold and compiled: benchmarks.variants) and the per-tensor loop
(natasha_ext.ops.reference).

Minimal traffic per parameter element (fp32): cg_step_ reads s, r, p, Bp, a and writes s, r, p
(32 B); cg_dots reads p, Bp, r, a (16 B); tr_cg_init_ reads g, v and writes v, a, s, r, p (28 B).
The 'cg_iteration' row is both passes of one CG iteration (48 B) — what a CG iteration costs on
top of its curvature product.
"""
import torch

from benchmarks.variants import COLD, op_cases
from natasha_ext import ops
from natasha_ext.ops import reference


def _state(ts):
    g = torch.Generator(device="cpu").manual_seed(1)
    mk = lambda: [torch.randn(t.shape, generator=g).to(t.device) for t in ts]
    a = [t.abs() + 0.5 for t in mk()]
    return dict(s=mk(), r=mk(), p=mk(), Bp=mk(), a=a, v=[t.abs() for t in mk()], g=mk())


def _sums(prods):
    return torch.stack([t.sum() for t in prods]).sum() if prods else torch.zeros(())


def foreach_cg_dots(p, Bp, r, a, temps=COLD):
    ba = temps.new("div", Bp, a)
    return torch.stack([_sums(temps.new("mul", p, Bp)), _sums(temps.new("mul", r, p)),
                        _sums(temps.new("mul", r, ba)), _sums(temps.new("mul", Bp, ba))])


def foreach_cg_step_(s, r, p, Bp, a, alpha, beta, temps=COLD):
    torch._foreach_add_(s, p, alpha=alpha)
    torch._foreach_add_(r, Bp, alpha=alpha)
    z = temps.new("div", r, a)
    torch._foreach_mul_(p, beta)
    torch._foreach_sub_(p, z)
    sa = temps.new("mul", s, a)
    return torch.stack([_sums(temps.new("mul", r, z)), _sums(temps.new("mul", sa, s)),
                        _sums(temps.new("mul", sa, p)), _sums(temps.new("mul", temps.new("mul", p, a), p))])


def foreach_tr_cg_init_(v, a, s, r, p, g, beta, eps, temps=COLD):
    torch._foreach_mul_(v, beta)
    torch._foreach_addcmul_(v, g, g, value=1 - beta)
    torch._foreach_copy_(a, v)
    torch._foreach_add_(a, eps)
    torch._foreach_zero_(s)
    torch._foreach_copy_(r, g)
    z = temps.new("div", g, a)
    torch._foreach_copy_(p, z)
    torch._foreach_neg_(p)
    return torch.stack([_sums(temps.new("mul", g, z)), _sums(temps.new("mul", g, g))])


# alpha/beta small so that repeated timing keeps the vectors bounded
ALPHA, BETA = 1e-3, 0.5
CG_STEP = (lambda i: ops.cg_step_(i["s"], i["r"], i["p"], i["Bp"], i["a"], ALPHA, BETA, fused=True),
           lambda i, t: foreach_cg_step_(i["s"], i["r"], i["p"], i["Bp"], i["a"], ALPHA, BETA, t),
           lambda i: reference.cg_step_(i["s"], i["r"], i["p"], i["Bp"], i["a"], ALPHA, BETA))
CG_DOTS = (lambda i: ops.cg_dots(i["p"], i["Bp"], i["r"], i["a"], fused=True),
           lambda i, t: foreach_cg_dots(i["p"], i["Bp"], i["r"], i["a"], t),
           lambda i: reference.cg_dots(i["p"], i["Bp"], i["r"], i["a"]))
CG_ITERATION = (lambda i: (CG_DOTS[0](i), CG_STEP[0](i)),
                lambda i, t: (CG_DOTS[1](i, t), CG_STEP[1](i, t)),
                lambda i: (CG_DOTS[2](i), CG_STEP[2](i)))
TR_CG_INIT = (lambda i: ops.tr_cg_init_(i["v"], i["a"], i["s"], i["r"], i["p"], i["g"], 0.8, 1e-8, "rmsprop",
                                        fused=True),
              lambda i, t: foreach_tr_cg_init_(i["v"], i["a"], i["s"], i["r"], i["p"], i["g"], 0.8, 1e-8, t),
              lambda i: reference.tr_cg_init_(i["v"], i["a"], i["s"], i["r"], i["p"], i["g"], 0.8, 1e-8, 1))


def cases():
    rows = (("cg_iteration", 48, CG_ITERATION), ("cg_step_", 32, CG_STEP), ("cg_dots", 16, CG_DOTS),
            ("tr_cg_init_", 28, TR_CG_INIT))
    return [c for op, nbytes, (fused, form, ref) in rows for c in op_cases(op, nbytes, _state, fused, form, ref)]
