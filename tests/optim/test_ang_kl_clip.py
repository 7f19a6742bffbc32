"""The KL clip bounds the step actually taken (issue 16): lr^2 d^T F d <= kl_clip for the step
d the parameters move by, with F the damped Kronecker Fisher of the layer factors,
(A + lam I) (x) (G + lam I) (IFANG: of its rank-s' factors), built densely here from the
optimizer's stored factors. ANG/IFANG step along a blend of U = F^-1 t and t, whose d^T F d is
not t^T F^-1 t; the problem makes the two directions differ strongly (inputs on scales 1e2 ..
1e-2, so F is far from a multiple of I)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, IFANG, KFAC

KL_CLIP = 1e-4


def _problem():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    scales = torch.tensor([100.0, 10.0, 1.0, 1.0, 0.1, 0.01], dtype=torch.float64)
    x = torch.randn(16, 6, dtype=torch.float64) * scales
    y = torch.randint(0, 4, (16,))
    return model, x, y


def _dense_fisher(state, lam):
    """(A + lam I) (x) (G + lam I) in the row-major vec of the (out, in+1) matrix [dW | db]."""
    if "kfac_A" in state:
        A, G = state["kfac_A"], state["kfac_G"]
    else:
        A, G = state["kfac_YA"].t() @ state["kfac_YA"], state["kfac_YG"].t() @ state["kfac_YG"]
    eye = lambda n: torch.eye(n, dtype=A.dtype)
    return torch.kron(G + lam * eye(G.shape[0]), A + lam * eye(A.shape[0]))


def _measured_kl(model, opt, before):
    """sum over layers of vec(delta)^T F vec(delta), delta = the parameter change (= lr d)."""
    total = 0.0
    for k in (0, 2):
        w, b = model[k].weight.detach(), model[k].bias.detach()
        delta = torch.cat([w - before[k][0], (b - before[k][1])[:, None]], 1).reshape(-1)
        lam = opt._factor_damping(opt.layer_names.index(str(k)))
        total += float(delta @ _dense_fisher(opt.state[model[k].weight], lam) @ delta)
    return total


MAKERS = {
    # a blend far from both ends, lr large enough that the clip binds
    "ANG": lambda m: ANG(m, lr=1.0, kl_clip=KL_CLIP, lam_schedule=lambda s: 0.7),
    "ANG-practical": lambda m: ANG.practical(m, lr=1.0, kl_clip=KL_CLIP, cov_every=1, lam_schedule=lambda s: 0.7),
    "IFANG": lambda m: IFANG(m, lr=1.0, kl_clip=KL_CLIP, rank=2, lam_schedule=lambda s: 0.7),
    # K-FAC steps along U itself (inverses of the current factors: inv_every 1)
    "KFAC": lambda m: KFAC(m, lr=1.0, momentum=0.0, kl_clip=KL_CLIP, cov_every=1, inv_every=1),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_kl_of_the_step_taken_is_clipped(name):
    model, x, y = _problem()
    opt = MAKERS[name](model)
    for step in range(3):
        before = {k: (model[k].weight.detach().clone(), model[k].bias.detach().clone()) for k in (0, 2)}
        if opt.param_groups[0]["momentum"]:
            opt.param_groups[0]["momentum"] = 0.0  # the step taken is lr * (clipped d) itself
        opt.step(lambda: F.cross_entropy(model(x), y))
        kl = _measured_kl(model, opt, before)
        assert kl <= KL_CLIP * (1 + 1e-6), f"step {step}: lr^2 d^T F d = {kl:.3e} > kl_clip {KL_CLIP}"
        # the clip binds here (an unclipped step is far larger), so the bound is attained
        assert kl >= KL_CLIP * (1 - 1e-6), f"step {step}: the clip did not bind ({kl:.3e})"


def test_the_blend_is_not_the_natural_gradient_here():
    """The problem separates the two readings: the blended d's d^T F d differs from t^T F^-1 t
    (the natural-gradient step's) by a large factor."""
    model, x, y = _problem()
    opt = ANG(model, lr=1.0, kl_clip=None, lam_schedule=lambda s: 0.7)
    before = {k: (model[k].weight.detach().clone(), model[k].bias.detach().clone()) for k in (0, 2)}
    opt.step(lambda: F.cross_entropy(model(x), y))
    taken = _measured_kl(model, opt, before)
    natural = 0.0
    for k in (0, 2):
        t = torch.cat([model[k].weight.grad, model[k].bias.grad[:, None]], 1).reshape(-1)
        lam = opt._factor_damping(opt.layer_names.index(str(k)))
        natural += float(t @ torch.linalg.solve(_dense_fisher(opt.state[model[k].weight], lam), t))
    assert taken > 10 * natural or natural > 10 * taken, (taken, natural)
