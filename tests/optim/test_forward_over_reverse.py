"""hvp='forward_over_reverse' (Pearlmutter's R-operator as forward-mode AD over the backward pass):
the same H v as the double backward from one closure evaluation, AdaHessian's steps with it equal
to hvp='exact', its fallback on backward operations whose forward-mode derivative fails, and the
errors that name what to change, with nothing changed."""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.curvature import hvp
from natasha_ext.optim import AdaHessian, HybridSGDAdaHessian, TrustRegion

D = torch.float64


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 8), nn.Tanh(), nn.Linear(8, 4)).to(D)


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=D), torch.randint(0, 4, (n,), generator=g)


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self):
        self.calls += 1
        return self.fn()


def _exact(closure, params, v):
    eng = hvp.HVP(closure, params, method="exact")
    try:
        return eng.loss, eng.grads, eng(v)
    finally:
        eng.release()


def test_matches_the_double_backward_on_a_conv_net():
    """g and H v of a conv + batch-norm + pooling + tanh net with cross-entropy (fp64) equal the
    double backward's to round-off, from one closure call, and the parameters carry no tangent
    afterwards and hold the same bits."""
    net, (x, y) = _conv_net(), _batch()
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    v = [torch.randn_like(p) for p in params]
    closure = _Counted(lambda: F.cross_entropy(net.eval()(x), y))  # eval: batch-norm stats stay fixed
    loss, grads, hv = hvp.gradient_and_hvp(closure, params, v)
    assert closure.calls == 1
    l_ref, g_ref, hv_ref = _exact(closure, params, v)
    assert float(loss) == float(l_ref)
    for a, b in zip(grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert max(float(h.abs().max()) for h in hv_ref) > 1e-3  # a product that could be wrong
    for a, b in zip(hv, hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for p, p0 in zip(params, before):
        assert torch.equal(p.detach(), p0)
        assert fwAD.unpack_dual(p).tangent is None


def test_training_mode_batch_norm_and_a_known_quadratic():
    """Batch statistics of the minibatch (train mode) are differentiated too; on a quadratic
    0.5 x'Hx + b'x the product is H v exactly."""
    net, (x, y) = _conv_net(), _batch()
    params = list(net.parameters())
    v = [torch.randn_like(p) for p in params]
    _, _, hv = hvp.gradient_and_hvp(lambda: F.cross_entropy(net.train()(x), y), params, v)
    _, _, hv_ref = _exact(lambda: F.cross_entropy(net.train()(x), y), params, v)
    for a, b in zip(hv, hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 5, generator=g, dtype=D)
    h, b = q @ q.T, torch.randn(5, generator=g, dtype=D)
    w = nn.Parameter(torch.randn(5, generator=g, dtype=D))
    u = torch.randn(5, generator=g, dtype=D)
    loss, (grad,), (hu,) = hvp.gradient_and_hvp(lambda: 0.5 * w @ h @ w + b @ w, [w], [u])
    torch.testing.assert_close(grad, h @ w.detach() + b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(hu, h @ u, rtol=1e-13, atol=1e-13)


def test_unreached_parameters_and_loss_scaling():
    """A parameter the loss does not reach gets zero g and H v and is reported in ``unused``;
    under loss_scale(S) the results come back unscaled."""
    net, (x, y) = _conv_net(), _batch()
    stray = nn.Parameter(torch.randn(3, dtype=D))
    params = list(net.parameters()) + [stray]
    v = [torch.randn_like(p) for p in params]
    closure = lambda: F.cross_entropy(net.eval()(x), y)
    unused = []
    _, grads, hv = hvp.gradient_and_hvp(closure, params, v, unused=unused)
    assert unused == [len(params) - 1]
    assert torch.equal(grads[-1], torch.zeros(3, dtype=D)) and torch.equal(hv[-1], torch.zeros(3, dtype=D))
    with hvp.loss_scale(1024.0):
        _, g_s, hv_s = hvp.gradient_and_hvp(closure, params, v)
    for a, b in zip(g_s + hv_s, grads + hv):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_backward_op_without_a_working_forward_derivative_falls_back_on_the_same_graph():
    """torch's mse_loss_backward has a failing forward-mode derivative: the product comes from
    the double backward on the same forward graph (no second closure call), with a warning, and
    equals hvp='exact'."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(D)
    x, t = torch.randn(9, 4, dtype=D), torch.randn(9, 2, dtype=D)
    params = list(net.parameters())
    v = [torch.randn_like(p) for p in params]
    closure = _Counted(lambda: F.mse_loss(net(x), t))
    with pytest.warns(RuntimeWarning, match="forward_over_reverse.*double backward on the same graph"):
        loss, grads, hv = hvp.gradient_and_hvp(closure, params, v)
    assert closure.calls == 1
    l_ref, g_ref, hv_ref = _exact(closure, params, v)
    assert float(loss) == float(l_ref)
    for a, b in zip(grads + hv, g_ref + hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the mean of squares written out has working derivatives: no warning, same product
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, hv2 = hvp.gradient_and_hvp(lambda: (net(x) - t).pow(2).mean(), params, v)
    for a, b in zip(hv2, hv_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], repr(opt.counters), repr(opt.rng.state_dict()),
            repr(opt.state_dict()["state"]))


def _unchanged(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


def test_a_forward_op_without_a_forward_derivative_is_a_clear_error_changing_nothing():
    net, (x, y) = _conv_net(), _batch()
    opt = AdaHessian(net.parameters(), hvp="forward_over_reverse", seed=0)
    opt.step(lambda: F.cross_entropy(net(x), y))  # state exists: the failed step must leave it alone
    before = _snapshot(net, opt)
    with pytest.raises(RuntimeError, match="hvp='forward_over_reverse'.*no forward-mode derivative.*hvp='exact'"):
        opt.step(lambda: F.cross_entropy(_NoJvp.apply(net(x)), y))
    assert _unchanged(before, _snapshot(net, opt))
    assert all(fwAD.unpack_dual(p).tangent is None for p in net.parameters())


@pytest.mark.parametrize("cls", [AdaHessian, HybridSGDAdaHessian])
def test_adahessian_steps_equal_the_exact_engines(cls):
    """Six fp64 steps on two groups with a parameter the loss never reaches, ahead of a conv kernel
    in its group (its kernel call splits off, shifting the params after it, so D = z * Hz is
    formed per draw) and
    update_each=2: the same probes (Philox offsets), counters and, to round-off, parameters as
    hvp='exact'; and the same steps for the other parameters as when the loss reaches the stray
    with a zero coefficient (one kernel call, no split: the probes each parameter sees are the same)."""
    def run(engine, reach_stray=False):
        net, (x, y) = _conv_net(), _batch()
        stray = nn.Parameter(torch.ones(4, dtype=D))
        ps = list(net.parameters())
        # D^(s)^2 forgets z's signs except where a block is averaged: the stray sits before the conv kernel
        opt = cls([{"params": [stray] + ps[:3], "weight_decay": 0.1}, {"params": ps[3:]}], lr=0.05,
                  update_each=2, hvp=engine, seed=5)
        if cls is HybridSGDAdaHessian:
            opt.report_validation_loss(0.0)  # straight to the AdaHessian phase
        for i in range(6):
            xb, yb = _batch(seed=10 + i)
            opt.step(lambda: F.cross_entropy(net(xb), yb) + (0.0 * stray.sum() if reach_stray else 0.0))
        return torch.cat([p.detach().flatten() for p in ps]), stray.detach(), opt
    a, sa, oa = run("exact")
    b, sb, ob = run("forward_over_reverse")
    assert (oa.rng.offset, repr(oa.counters)) == (ob.rng.offset, repr(ob.counters))
    assert ob.counters["hessian_updates"] == 3
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    assert torch.equal(sa, torch.ones(4, dtype=D)) and torch.equal(sb, sa)  # unreached: it stays put
    for engine, result in (("exact", a), ("forward_over_reverse", b)):
        reached, s_reached, _ = run(engine, reach_stray=True)
        assert not torch.equal(s_reached, sa)  # reached, the stray decays: the calls did not split
        torch.testing.assert_close(result, reached, rtol=1e-12, atol=1e-14)


def test_drop_in_steps_use_the_graph_they_are_given():
    net, (x, y) = _conv_net(), _batch()
    opt = AdaHessian(net.parameters(), hvp="forward_over_reverse", seed=0)
    ref_net = _conv_net()
    ref = AdaHessian(ref_net.parameters(), hvp="exact", seed=0)
    for model, o in ((net, opt), (ref_net, ref)):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=True)
        o.step()
    for a, b in zip(net.parameters(), ref_net.parameters()):
        assert torch.equal(a, b)


def test_arguments_naming_the_setting():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="n_samples.*forward_over_reverse.*must be 1"):
        AdaHessian([w], hvp="forward_over_reverse", n_samples=2)
    with pytest.raises(ValueError, match="hvp"):  # many products per point: the oracle engines only
        TrustRegion([w], hvp="forward_over_reverse")
