"""AdaHessian / HybridSGDAdaHessian against hand transcriptions of the papers' updates, step by step,
on a tiny least-squares problem with fixed minibatches (issue 16).

Attias, Cadei & Novakovic, "Discussion on the viability of a modern second order method in
non-convex optimization training a deep convolutional neural network" (EPFL, undated):
eq. 2 (SGD with momentum, as printed), eqs. 3, 8-10 (AdaHessian: Adam's first moment, Hutchinson
D = z * Hz, the spatial average D^(s) of eq. 9, the root-mean-square of eq. 10), Section II's
switch at validation loss < tl. Yao et al., "ADAHESSIAN: an adaptive second order optimizer for
machine learning" (2020), Algorithm 1 has the same update.

The problem: f_b(x) = 1/2 ||A_b x - y_b||^2 over three fixed minibatches b, x shaped like a conv
weight (2 kernels of 2x2, so eq. 9 averages groups of 4), g = A_b^T (A_b x - y_b) and H = A_b^T A_b
written out by hand; only the Rademacher probes z come from the optimizer's Philox stream (same
seed, same order), as the minibatches are fixed inputs.
"""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import PhiloxStream
from natasha_ext.optim import AdaHessian, HybridSGDAdaHessian

FUSED = [False] + ([True] if ops.fused_available() else [])
SHAPE = (2, 1, 2, 2)  # two conv kernels of 2x2: eq. 9 averages 4 entries each
N = 8
F64 = torch.float64


def problem():
    g = torch.Generator().manual_seed(3)
    A = [torch.randn(6, N, generator=g, dtype=F64) for _ in range(3)]
    y = [torch.randn(6, generator=g, dtype=F64) for _ in range(3)]
    x0 = torch.randn(N, generator=g, dtype=F64)
    return A, y, x0


def loss(A, y, x):  # autograd view of the same f_b for the optimizer (it differentiates itself)
    r = A @ x.reshape(-1) - y
    return 0.5 * (r * r).sum()


def val_loss(A, y, x):
    return sum(float(loss(a, b, x)) for a, b in zip(A, y)) / len(A)


# ------------------------------------------------------------------ hand transcriptions
def d_s(D, abs_first):
    """Eq. 9: D^(s) = the mean of D over each block (here each 2x2 kernel), spread over the block.
    abs_first: the mean of |D| (Yao et al.'s released code) instead."""
    blocks = D.reshape(2, 4)
    mean = (blocks.abs() if abs_first else blocks).mean(dim=1, keepdim=True)
    return mean.expand(2, 4).reshape(-1)


class HandAdaHessian:
    """Eqs. 3, 8-10 with Hessian power 1: m, v from zero, bias-corrected, x -= lr m^ / (sqrt(v^) + eps)."""

    def __init__(self, seed, lr, b1, b2, eps, abs_first):
        self.rng, self.lr, self.b1, self.b2, self.eps, self.abs_first = PhiloxStream(seed), lr, b1, b2, eps, abs_first
        self.m, self.v, self.t = torch.zeros(N, dtype=F64), torch.zeros(N, dtype=F64), 0

    def step(self, A, y, x):
        self.t += 1
        g = A.T @ (A @ x - y)
        z = torch.empty(SHAPE, dtype=F64)
        self.rng.rademacher_([z], fused=False)
        z = z.reshape(-1)
        D = z * ((A.T @ A) @ z)                                   # eq. 8, one probe
        Ds = d_s(D, self.abs_first)                               # eq. 9
        self.m = self.b1 * self.m + (1 - self.b1) * g             # eq. 3
        self.v = self.b2 * self.v + (1 - self.b2) * Ds * Ds       # eq. 10 (before the root)
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_root = (self.v / (1 - self.b2 ** self.t)).sqrt()
        return x - self.lr * m_hat / (v_root + self.eps)


def hand_hybrid(A, y, x0, epochs, tl, sgd_lr, mu, form, lr, seed):
    """Attias et al.'s HYBRID: SGD with momentum, one validation loss per epoch (3 steps), the
    switch at the first one < tl, then AdaHessian with fresh moments. SGD momentum, ``form``:
    'torch': buf = g at step 1, then mu buf + g; 'paper' (eq. 2): m = mu m + (1 - mu) g, m0 = 0.
    Returns the iterate after every step and the epoch after which it switched."""
    x, buf, ada, xs, switched = x0.clone(), None, None, [], None
    for epoch in range(1, epochs + 1):
        for b in range(3):
            if ada is None:
                g = A[b].T @ (A[b] @ x - y[b])
                if form == "torch":
                    buf = g.clone() if buf is None else mu * buf + g
                else:
                    buf = (1 - mu) * g if buf is None else mu * buf + (1 - mu) * g
                x = x - sgd_lr * buf
            else:
                x = ada.step(A[b], y[b], x)
            xs.append(x.clone())
        if ada is None and val_loss(A, y, x) < tl:
            ada, switched = HandAdaHessian(seed, lr, 0.9, 0.999, 1e-4, abs_first=False), epoch
    return xs, switched


# ------------------------------------------------------------------ the optimizers, step by step
def run_hybrid(A, y, x0, epochs, fused, **kw):
    p = x0.clone().reshape(SHAPE).requires_grad_()
    opt = HybridSGDAdaHessian([p], fused=fused, **kw)
    xs = []
    for epoch in range(1, epochs + 1):
        for b in range(3):
            opt.step(lambda: loss(A[b], y[b], p))
            xs.append(p.detach().reshape(-1).clone())
        opt.report_validation_loss(val_loss(A, y, p.detach()), epoch=epoch)
    return xs, opt


HYBRID = dict(switch_threshold=None, sgd_lr=0.005, momentum=0.9, lr=0.05, seed=7)


def _threshold(A, y, x0, form):
    """A tl that the hand transcription crosses after epoch 2 (so both phases run for 2+ epochs)."""
    xs, _ = hand_hybrid(A, y, x0, 2, -1.0, HYBRID["sgd_lr"], HYBRID["momentum"], form, HYBRID["lr"], HYBRID["seed"])
    v1, v2 = val_loss(A, y, xs[2]), val_loss(A, y, xs[5])
    assert v2 < v1, "the SGD phase must decrease the validation loss on this problem"
    return 0.5 * (v1 + v2)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("form", ["torch", "paper"])
def test_hybrid_switch_and_sgd_phase_match_the_transcription(form, fused):
    A, y, x0 = problem()
    tl = _threshold(A, y, x0, form)
    kw = dict(HYBRID, switch_threshold=tl)
    if form != "torch":
        kw["sgd_momentum_form"] = form  # the class default is 'torch', the form behind Table I
    want, want_switch = hand_hybrid(A, y, x0, 4, tl, kw["sgd_lr"], kw["momentum"], form, kw["lr"], kw["seed"])
    got, opt = run_hybrid(A, y, x0, 4, fused, **kw)
    assert want_switch == 2 and opt.switch_epoch == 2 and opt.switch_step == 6
    assert opt.counters["sgd_steps"] == 6 and opt.counters["hvps"] == 6
    for t, (a, b) in enumerate(zip(got, want), 1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {t}: {m}")


def test_the_two_sgd_forms_differ_by_one_minus_momentum_at_the_first_step():
    """The check above tells the forms apart: eq. 2's first step is (1 - mu) times torch's."""
    A, y, x0 = problem()
    steps = {}
    for form in ("torch", "paper"):
        got, _ = run_hybrid(A, y, x0, 1, False, **dict(HYBRID, switch_threshold=-1.0, sgd_momentum_form=form))
        steps[form] = got[0] - x0
    torch.testing.assert_close(steps["paper"], (1 - HYBRID["momentum"]) * steps["torch"], rtol=1e-12, atol=0)


# ------------------------------------------------------------------ D^(s): eq. 9's signed mean by default
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("preset", ["default", "practical"])
def test_adahessian_d_s_matches_the_transcription(preset, fused):
    A, y, x0 = problem()
    p = x0.clone().reshape(SHAPE).requires_grad_()
    make = AdaHessian if preset == "default" else AdaHessian.practical
    opt = make([p], lr=0.05, seed=11, fused=fused)
    hand = HandAdaHessian(11, 0.05, 0.9, 0.999, 1e-4, abs_first=preset == "practical")
    x = x0.clone()
    for t in range(6):
        b = t % 3
        opt.step(lambda: loss(A[b], y[b], p))
        x = hand.step(A[b], y[b], x)
        torch.testing.assert_close(p.detach().reshape(-1), x, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"step {t + 1}: {m}")
    torch.testing.assert_close(opt.state[p]["exp_hessian_diag_sq"].reshape(-1), hand.v, rtol=1e-10, atol=1e-14)


def test_the_two_d_s_forms_differ_on_this_problem():
    """Some kernel's D has mixed signs at the first probe, so mean D != mean |D| there and the
    check above tells the forms apart."""
    A, y, x0 = problem()
    z = torch.empty(SHAPE, dtype=F64)
    PhiloxStream(11).rademacher_([z], fused=False)
    z = z.reshape(-1)
    D = z * ((A[0].T @ A[0]) @ z)
    assert (d_s(D, False).abs() - d_s(D, True)).abs().max() > 0.1 * d_s(D, True).max()
