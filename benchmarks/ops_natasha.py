"""Rows for the natasha ops: svrg_step (Natasha1.5's variance-reduced inner step) and oja_step,
in the variants of benchmarks.variants (fused, foreach-warm/-cold, compiled, per-tensor).

svrg_step is timed in the faithful configuration d = g - g_snap + mu + 2 sigma (x - x_hat):
reads x, g, g_snap, mu, x_hat, avg_sum and writes x, avg_sum (32 B/param in fp32). oja_step
reads w, Hw and writes w (12 B/param).
"""
import torch

from benchmarks.variants import COLD, op_cases
from natasha_ext import ops
from natasha_ext.ops import reference

LR, REG, ETA = 0.01, 1.0, 0.1


def svrg_foreach(x, g, gs, mu, a, s, lr, reg, temps=COLD):
    """d = g - gs + mu + reg (x - a); s += x - a; x -= lr d, as torch._foreach_* calls."""
    d = temps.new("sub", g, gs)
    torch._foreach_add_(d, mu)
    diff = temps.new("sub", x, a)
    torch._foreach_add_(d, diff, alpha=reg)
    torch._foreach_add_(s, diff)
    torch._foreach_add_(x, d, alpha=-lr)
    return torch.stack(torch._foreach_norm(d)).square().sum()


def oja_foreach(w, hw, scale, eta, temps=COLD):
    """<w, Hw> via the polarisation identity on foreach norms; w <- scale (w - eta Hw); ||w||."""
    plus, minus = temps.new("add", w, hw), temps.new("sub", w, hw)
    dot = (torch.stack(torch._foreach_norm(plus)).square().sum()
           - torch.stack(torch._foreach_norm(minus)).square().sum()) / 4
    torch._foreach_add_(w, hw, alpha=-eta)
    torch._foreach_mul_(w, scale)
    return torch.stack([torch.stack(torch._foreach_norm(w)).norm(), scale * scale * dot])


def _svrg_inputs(ts):
    mk = lambda: [torch.randn_like(t) for t in ts]
    return dict(x=ts, g=mk(), gs=mk(), mu=mk(), a=[t.clone() for t in ts], s=[torch.zeros_like(t) for t in ts])


def _oja_inputs(ts):
    return dict(w=ts, hw=[torch.randn_like(t) * 1e-3 for t in ts], scale=torch.ones((), device=ts[0].device))


def cases():
    out = op_cases("svrg_step", 32, _svrg_inputs,
                   fused=lambda i: ops.svrg_step(i["x"], i["g"], i["a"], i["s"], lr=LR, reg=REG,
                                                 snapshot_grads=i["gs"], mu=i["mu"], fused=True),
                   form=lambda i, t: svrg_foreach(i["x"], i["g"], i["gs"], i["mu"], i["a"], i["s"], LR, REG, t),
                   reference=lambda i: reference.svrg_step(i["x"], i["g"], i["gs"], i["mu"], i["a"], i["s"], LR,
                                                           REG, 0, None, 0.0, 0.0))
    out += op_cases("oja_step", 12, _oja_inputs,
                    fused=lambda i: ops.oja_step(i["w"], i["hw"], i["scale"], ETA, fused=True),
                    form=lambda i, t: oja_foreach(i["w"], i["hw"], i["scale"], ETA, t),
                    reference=lambda i: reference.oja_step(i["w"], i["hw"], i["scale"], ETA))
    return out
