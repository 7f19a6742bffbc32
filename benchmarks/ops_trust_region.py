"""Rows for the trust-region ops: one Steihaug-CG iteration's vector work (cg_dots + cg_step_),
and the ellipsoid update fused with the CG start (tr_cg_init_), each against a torch._foreach_*
reference and the per-tensor loop (natasha_ext.ops.reference).

Minimal traffic per parameter element (fp32): cg_step_ reads s, r, p, Bp, a and writes s, r, p
(32 B); cg_dots reads p, Bp, r, a (16 B); tr_cg_init_ reads g, v and writes v, a, s, r, p (28 B).
The 'cg_iteration' row is both passes of one CG iteration (48 B) — what a CG iteration costs on
top of its curvature product.
"""
import torch

from benchmarks.common import Case
from natasha_ext import ops
from natasha_ext.ops import reference


def _state(ts):
    g = torch.Generator(device="cpu").manual_seed(1)
    mk = lambda: [torch.randn(t.shape, generator=g).to(t.device) for t in ts]
    a = [t.abs() + 0.5 for t in mk()]
    return dict(s=mk(), r=mk(), p=mk(), Bp=mk(), a=a, v=[t.abs() for t in mk()], g=mk())


def _sums(prods):
    return torch.stack([t.sum() for t in prods]).sum() if prods else torch.zeros(())


def foreach_cg_dots(p, Bp, r, a):
    ba = torch._foreach_div(Bp, a)
    return torch.stack([_sums(torch._foreach_mul(p, Bp)), _sums(torch._foreach_mul(r, p)),
                        _sums(torch._foreach_mul(r, ba)), _sums(torch._foreach_mul(Bp, ba))])


def foreach_cg_step_(s, r, p, Bp, a, alpha, beta):
    torch._foreach_add_(s, p, alpha=alpha)
    torch._foreach_add_(r, Bp, alpha=alpha)
    z = torch._foreach_div(r, a)
    torch._foreach_mul_(p, beta)
    torch._foreach_sub_(p, z)
    sa = torch._foreach_mul(s, a)
    return torch.stack([_sums(torch._foreach_mul(r, z)), _sums(torch._foreach_mul(sa, s)),
                        _sums(torch._foreach_mul(sa, p)), _sums(torch._foreach_mul(torch._foreach_mul(p, a), p))])


def foreach_tr_cg_init_(v, a, s, r, p, g, beta, eps):
    torch._foreach_mul_(v, beta)
    torch._foreach_addcmul_(v, g, g, value=1 - beta)
    torch._foreach_copy_(a, v)
    torch._foreach_add_(a, eps)
    torch._foreach_zero_(s)
    torch._foreach_copy_(r, g)
    z = torch._foreach_div(g, a)
    torch._foreach_copy_(p, z)
    torch._foreach_neg_(p)
    return torch.stack([_sums(torch._foreach_mul(g, z)), _sums(torch._foreach_mul(g, g))])


def _case(op, variant):
    def setup(ts):
        st = _state(ts)
        s, r, p, Bp, a, v, g = (st[k] for k in ("s", "r", "p", "Bp", "a", "v", "g"))
        # alpha/beta small so that repeated timing keeps the vectors bounded
        if op == "cg_step_":
            return {"fused": lambda: ops.cg_step_(s, r, p, Bp, a, 1e-3, 0.5, fused=True),
                    "foreach": lambda: foreach_cg_step_(s, r, p, Bp, a, 1e-3, 0.5),
                    "per-tensor": lambda: reference.cg_step_(s, r, p, Bp, a, 1e-3, 0.5)}[variant]
        if op == "cg_dots":
            return {"fused": lambda: ops.cg_dots(p, Bp, r, a, fused=True),
                    "foreach": lambda: foreach_cg_dots(p, Bp, r, a),
                    "per-tensor": lambda: reference.cg_dots(p, Bp, r, a)}[variant]
        if op == "cg_iteration":
            return {"fused": lambda: (ops.cg_dots(p, Bp, r, a, fused=True),
                                      ops.cg_step_(s, r, p, Bp, a, 1e-3, 0.5, fused=True)),
                    "foreach": lambda: (foreach_cg_dots(p, Bp, r, a), foreach_cg_step_(s, r, p, Bp, a, 1e-3, 0.5)),
                    "per-tensor": lambda: (reference.cg_dots(p, Bp, r, a),
                                           reference.cg_step_(s, r, p, Bp, a, 1e-3, 0.5))}[variant]
        return {"fused": lambda: ops.tr_cg_init_(v, a, s, r, p, g, 0.8, 1e-8, "rmsprop", fused=True),
                "foreach": lambda: foreach_tr_cg_init_(v, a, s, r, p, g, 0.8, 1e-8),
                "per-tensor": lambda: reference.tr_cg_init_(v, a, s, r, p, g, 0.8, 1e-8, 1)}[variant]
    return setup


def cases():
    nbytes = {"cg_step_": 32, "cg_dots": 16, "cg_iteration": 48, "tr_cg_init_": 28}
    return [Case(op, v, nbytes[op], _case(op, v)) for op in ("cg_iteration", "cg_step_", "cg_dots", "tr_cg_init_")
            for v in ("fused", "foreach", "per-tensor")]
