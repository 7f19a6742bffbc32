"""The shared HVP engines and the closure convention."""
import pytest
import torch

from natasha_ext.curvature import HVP, evaluate_closure


def _quadratic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = q @ q.T - 2 * torch.eye(n, dtype=torch.float64)  # indefinite
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x = torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64))
    return h, b, x, (lambda: 0.5 * x @ h @ x + b @ x)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_hvp_matches_known_hessian(method):
    h, b, x, closure = _quadratic()
    x0 = x.detach().clone()
    eng = HVP(closure, [x], method=method, fd_eps=1e-6)
    torch.testing.assert_close(eng.grads[0], h @ x0 + b)
    for i in range(3):
        v = torch.randn(6, dtype=torch.float64)
        (hv,) = eng([v])
        tol = 1e-10 if method == "exact" else 1e-6
        torch.testing.assert_close(hv, h @ v, rtol=tol, atol=tol)
    assert eng.n_hvp == 3
    assert torch.equal(x.detach(), x0)  # finite differences restore the parameters bit-exactly
    eng.release()


def test_hvp_nonlinear_net_engines_agree():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).double()
    xb, yb = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    closure = lambda: torch.nn.functional.mse_loss(net(xb), yb)
    params = list(net.parameters())
    v = [torch.randn_like(p) for p in params]
    exact = HVP(closure, params, "exact")(v)
    fd = HVP(closure, params, "finite_difference", fd_eps=1e-6)(v)
    for a, b in zip(exact, fd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the exact engine leaves nothing in .grad
    assert all(p.grad is None for p in params)


def test_closure_validation():
    x = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="needs a closure"):
        evaluate_closure(None)
    with pytest.raises(ValueError, match="scalar"):
        evaluate_closure(lambda: x * 2)
    with pytest.raises(ValueError, match="grad_fn"):
        evaluate_closure(lambda: x.detach().sum())
    with pytest.raises(TypeError, match="must return a Tensor"):
        evaluate_closure(lambda: 1.0)
    with pytest.raises(ValueError, match="hvp must be one of"):
        HVP(lambda: x.sum(), [x], method="magic")
