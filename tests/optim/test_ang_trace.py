"""ANG and IFANG step by step against a hand transcription of Tang, Jiang, Song, Gong, Li, Yu, Wang
& Wang, "AsymptoticNG: a regularized natural gradient optimization algorithm with look-ahead
strategy" (2021): Algorithm 2 (a plain step theta <- theta + eta grad^D, line 9) with the
direction of eq. 7, on a tiny MLP with fixed minibatches.

* ANG (eqs. 7-10): the factors of the current minibatch, lam I + A^T A / M and
  lam I + DS^T DS / M (eqs. 9-10), inverted densely (eq. 8);
* IFANG (eqs. 11-14): Algorithm 1 with s' = 1: the rows of A and DS mean-reduced to one row Y,
  X^-1 = lam^-1 [I - Y^T (lam + Y Y^T)^-1 Y] (eqs. 11-12), grad^D by eq. 14.

The transcription computes everything from the model's own forward pass (layer inputs and
per-example pre-activation derivatives by autograd), independently of the optimizer's hooks,
factor code and kernels, and runs with the optimizers' *default* hyperparameters apart from the
blend schedule: the defaults are the algorithm box.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, IFANG

STEPS, BATCH, TOTAL = 4, 7, 6
LINEARS = (0, 2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def _statistics(model, x, y):
    """Per layer: (A rows with the bias column [M, in+1], per-example pre-activation derivatives
    DS [M, out], gradient matrix [dW | db]) of the mean cross-entropy at the current weights."""
    h, acts, pre = x, [], []
    for k, mod in enumerate(model):
        if k in LINEARS:
            acts.append(h)
            h = mod(h)
            pre.append(h)
        else:
            h = mod(h)
    loss = F.cross_entropy(h, y)
    params = [p for k in LINEARS for p in (model[k].weight, model[k].bias)]
    grads = torch.autograd.grad(loss, pre + params)
    M = x.shape[0]
    out = []
    for j in range(len(LINEARS)):
        a = torch.cat([acts[j].detach(), torch.ones(M, 1, dtype=x.dtype)], 1)
        ds = M * grads[j]  # d(per-example loss)/ds: the loss is the batch mean
        gw, gb = grads[len(pre) + 2 * j], grads[len(pre) + 2 * j + 1]
        out.append((a, ds, torch.cat([gw, gb[:, None]], 1)))
    return out


def _ang_inverses(a, ds, lam):
    """eqs. 9-10 (the minibatch factors, lam added to each) inverted (eq. 8)."""
    M = a.shape[0]
    omega = lam * torch.eye(a.shape[1], dtype=a.dtype) + a.t() @ a / M
    gamma = lam * torch.eye(ds.shape[1], dtype=a.dtype) + ds.t() @ ds / M
    return torch.linalg.inv(omega), torch.linalg.inv(gamma)


def _algorithm1_s1(y, lam):
    """Algorithm 1 with s' = 1: Y mean-reduced to one row, X^-1 = lam^-1 [I - Y^T (lam + Y Y^T)^-1 Y]."""
    y = y.mean(0, keepdim=True)
    return (torch.eye(y.shape[1], dtype=y.dtype) - y.t() @ torch.linalg.inv(lam + y @ y.t()) @ y) / lam


def _ifang_inverses(a, ds, lam):
    return _algorithm1_s1(a, lam), _algorithm1_s1(ds, lam)


def _eq7(t, nat, blend):
    """grad^D = ||t||_G (sin((1-lam)W)/sin W * G^-1 t/||t||_G + sin(lam W)/sin W * t/||t||), with
    ||t||_G = ||G^-1 t|| and cos W = t^T G^-1 t / (||t||_G ||t||), over the whole vector."""
    norm_g, norm = nat.norm(), t.norm()
    w = math.acos(float(t @ nat / (norm_g * norm)))
    return norm_g * (math.sin((1 - blend) * w) / math.sin(w) * nat / norm_g
                     + math.sin(blend * w) / math.sin(w) * t / norm)


def _transcription(inverses, lam, lr, blend):
    """Parameters after each step of Algorithm 2 run by hand."""
    model = _model()
    trace = []
    for step, (x, y) in enumerate(_batches()):
        ts, nats = [], []
        for a, ds, grad in _statistics(model, x, y):
            omega_inv, gamma_inv = inverses(a, ds, lam)
            t = -grad
            ts.append(t.reshape(-1))
            nats.append((gamma_inv @ t @ omega_inv).reshape(-1))  # eq. 8/14 in the (out, in) layout
        d = _eq7(torch.cat(ts), torch.cat(nats), blend(step))
        with torch.no_grad():
            k = 0
            for j in LINEARS:
                w, b = model[j].weight, model[j].bias
                n = w.numel() + b.numel()
                upd = d[k:k + n].reshape(w.shape[0], w.shape[1] + 1)
                w += lr * upd[:, :-1]   # line 9: theta <- theta + eta grad^D
                b += lr * upd[:, -1]
                k += n
        trace.append([p.detach().clone() for p in model.parameters()])
    return trace


def _optimizer_run(cls, blend):
    model = _model()
    opt = cls(model, lam_schedule=blend)
    trace = []
    for x, y in _batches():
        opt.step(lambda: F.cross_entropy(model(x), y))
        trace.append([p.detach().clone() for p in model.parameters()])
    return opt, trace


BLENDS = {"rising": lambda s: s / TOTAL, "mid": lambda s: 0.4}


@pytest.mark.parametrize("blend", list(BLENDS), ids=list(BLENDS))
@pytest.mark.parametrize("cls,inverses", [(ANG, _ang_inverses), (IFANG, _ifang_inverses)], ids=["ANG", "IFANG"])
def test_default_step_is_algorithm_2(cls, inverses, blend):
    opt, got = _optimizer_run(cls, BLENDS[blend])
    group = opt.param_groups[0]
    # the defaults under test: a plain step (no momentum, no clip), the per-factor lam of eq. 8
    assert group["momentum"] == 0.0 and opt.kl_clip is None and group["damping"] is None
    want = _transcription(inverses, group["factor_damping"], group["lr"], BLENDS[blend])
    assert opt.counters["factor_updates"] == STEPS  # the factors of every minibatch (eqs. 9-10)
    for step, (g, w) in enumerate(zip(got, want)):
        for p, q in zip(g, w):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step}: {m}")
