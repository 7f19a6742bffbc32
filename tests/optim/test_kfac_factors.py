"""K-FAC's Kronecker factors as an exponential moving average, by known answers: two steps of a
tiny layer with chosen activations and output gradients (cov_every=1) give
A = d A_1 + (1 - d) A_2 and G = d G_1 + (1 - d) G_2, d = stat_decay, and the second step is the
damped Kronecker inverse of exactly these factors applied to the gradient."""
import pytest
import torch
import torch.nn as nn

from natasha_ext.optim import KFAC
from tests.helpers import requires_fused

D = torch.float64
X = [torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=D), torch.tensor([[0.0, 1.0], [2.0, 2.0]], dtype=D)]
DOUT = [torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=D), torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=D)]
# A_t = a^T a / B with a = [x, 1] (bias column); G_t = B dout^T dout (batch-averaged loss: the
# per-example gradient is B dout), worked out by hand for the batches above (B = 2)
A1 = [[5.0, -0.5, 2.0], [-0.5, 2.5, 0.5], [2.0, 0.5, 1.0]]
A2 = [[2.0, 2.0, 1.0], [2.0, 2.5, 1.5], [1.0, 1.5, 1.0]]
G1 = [[2.5, -1.0], [-1.0, 2.0]]
G2 = [[8.0, 4.0], [4.0, 4.0]]
DECAY = 0.75
A_EMA = [[4.25, 0.125, 1.75], [0.125, 2.5, 0.75], [1.75, 0.75, 1.0]]  # 0.75 A1 + 0.25 A2
G_EMA = [[3.875, 0.25], [0.25, 2.5]]                                   # 0.75 G1 + 0.25 G2


def _backward(layer, t):
    """Forward batch t; the loss sum(out * DOUT[t]) makes dL/dout = DOUT[t]."""
    layer.zero_grad()
    (layer(X[t]) * DOUT[t]).sum().backward()
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)])
def test_factor_ema_known_answer(fused):
    torch.manual_seed(0)
    layer = nn.Linear(2, 2).double()
    lam, lr = 0.1, 0.5
    opt = KFAC(nn.Sequential(layer), lr=lr, momentum=0.0, damping=lam ** 2, stat_decay=DECAY, kl_clip=None,
               cov_every=1, inv_every=1, fused=fused, fisher="empirical")
    st = opt.state[layer.weight]
    _backward(layer, 0)
    opt.step()
    torch.testing.assert_close(st["kfac_A"], torch.tensor(A1, dtype=D), rtol=1e-12, atol=1e-12)  # first: no EMA
    torch.testing.assert_close(st["kfac_G"], torch.tensor(G1, dtype=D), rtol=1e-12, atol=1e-12)
    T = _backward(layer, 1)
    before = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    opt.step()
    A, G = torch.tensor(A_EMA, dtype=D), torch.tensor(G_EMA, dtype=D)
    torch.testing.assert_close(st["kfac_A"], A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["kfac_G"], G, rtol=1e-12, atol=1e-12)
    # damping lam^2 splits as lam per factor: W -= lr (G + lam I)^-1 T (A + lam I)^-1
    U = torch.linalg.solve(G + lam * torch.eye(2, dtype=D), T) @ torch.linalg.inv(A + lam * torch.eye(3, dtype=D))
    after = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    torch.testing.assert_close((before - after) / lr, U, rtol=1e-10, atol=1e-12)


def test_hand_worked_factors_follow_their_definition():
    """The literals above are A_t = a^T a / B and G_t = B dout^T dout of the batches."""
    for x, dout, A, G in zip(X, DOUT, (A1, A2), (G1, G2)):
        a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=D)], 1)
        torch.testing.assert_close(a.T @ a / x.shape[0], torch.tensor(A, dtype=D))
        torch.testing.assert_close(x.shape[0] * dout.T @ dout, torch.tensor(G, dtype=D))
    for ema, one, two in ((A_EMA, A1, A2), (G_EMA, G1, G2)):
        torch.testing.assert_close(torch.tensor(ema), DECAY * torch.tensor(one) + (1 - DECAY) * torch.tensor(two))


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_stored_inverses_are_contiguous(inverse):
    """The fused kfac_precondition takes row-major inverses; a column-major one (what
    cholesky_inverse returns) costs a transposing copy of every factor on every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = KFAC(model, lr=0.1, cov_every=1, inv_every=1, inverse=inverse)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    for layer in (model[0], model[2]):
        st = opt.state[layer.weight]
        for key in ("kfac_A_inv", "kfac_G_inv"):
            assert st[key].is_contiguous(), (inverse, key, st[key].stride())
            if inverse == "cholesky":  # the .mT view is the same matrix only because it is exactly symmetric
                torch.testing.assert_close(st[key], st[key].mT, rtol=0, atol=0)
