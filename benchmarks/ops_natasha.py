"""Rows for the natasha ops: svrg_step (Natasha1.5's variance-reduced inner step) and oja_step.

Variants: 'fused' (the kernels), 'foreach' (torch._foreach_* ops, what an optimizer written in
PyTorch would do), 'per-tensor' (the reference: a plain loop over tensors).
svrg_step is timed in the faithful configuration d = g - g_snap + mu + 2 sigma (x - x_hat):
reads x, g, g_snap, mu, x_hat, avg_sum and writes x, avg_sum (32 B/param in fp32). oja_step
reads w, Hw and writes w (12 B/param).
"""
import torch

from benchmarks.common import Case
from natasha_ext import ops
from natasha_ext.ops import reference

LR, REG, ETA = 0.01, 1.0, 0.1


def svrg_foreach(x, g, gs, mu, a, s, lr, reg):
    """d = g - gs + mu + reg (x - a); s += x - a; x -= lr d, as torch._foreach_* calls."""
    d = torch._foreach_sub(g, gs)
    torch._foreach_add_(d, mu)
    diff = torch._foreach_sub(x, a)
    torch._foreach_add_(d, diff, alpha=reg)
    torch._foreach_add_(s, diff)
    torch._foreach_add_(x, d, alpha=-lr)
    return torch.stack(torch._foreach_norm(d)).square().sum()


def oja_foreach(w, hw, scale, eta):
    """<w, Hw> via the polarisation identity on foreach norms; w <- scale (w - eta Hw); ||w||."""
    plus, minus = torch._foreach_add(w, hw), torch._foreach_sub(w, hw)
    dot = (torch.stack(torch._foreach_norm(plus)).square().sum()
           - torch.stack(torch._foreach_norm(minus)).square().sum()) / 4
    torch._foreach_add_(w, hw, alpha=-eta)
    torch._foreach_mul_(w, scale)
    return torch.stack([torch.stack(torch._foreach_norm(w)).norm(), scale * scale * dot])


def _svrg(variant):
    def setup(ts):
        g = [torch.randn_like(t) for t in ts]
        gs = [torch.randn_like(t) for t in ts]
        mu = [torch.randn_like(t) for t in ts]
        a = [t.clone() for t in ts]
        s = [torch.zeros_like(t) for t in ts]
        if variant == "fused":
            return lambda: ops.svrg_step(ts, g, a, s, lr=LR, reg=REG, snapshot_grads=gs, mu=mu, fused=True)
        if variant == "foreach":
            return lambda: svrg_foreach(ts, g, gs, mu, a, s, LR, REG)
        return lambda: reference.svrg_step(ts, g, gs, mu, a, s, LR, REG, 0, None, 0.0, 0.0)
    return setup


def _oja(variant):
    def setup(ts):
        hw = [torch.randn_like(t) * 1e-3 for t in ts]
        scale = torch.ones((), device=ts[0].device)
        if variant == "fused":
            return lambda: ops.oja_step(ts, hw, scale, ETA, fused=True)
        if variant == "foreach":
            return lambda: oja_foreach(ts, hw, scale, ETA)
        return lambda: reference.oja_step(ts, hw, scale, ETA)
    return setup


def cases():
    out = [Case("svrg_step", v, 32, _svrg(v)) for v in ("fused", "foreach", "per-tensor")]
    out += [Case("oja_step", v, 12, _oja(v)) for v in ("fused", "foreach", "per-tensor")]
    return out
