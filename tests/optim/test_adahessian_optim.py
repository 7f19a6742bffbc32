"""AdaHessian / HybridSGDAdaHessian: Hutchinson vs the exact Hessian diagonal, agreement with a plain
implementation of the paper's update, update_each, the hybrid switch, graphs, NaN skips, state_dict."""
import copy
import gc
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

from natasha_ext.curvature import HVP, hutchinson_diagonal
from natasha_ext.ops import PhiloxStream
from natasha_ext.optim import AdaHessian, HybridSGDAdaHessian

FUSED = [False] + ([True] if __import__("natasha_ext").ops.fused_available() else [])


# ------------------------------------------------------------------ small problems
def tiny_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def tiny_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 3 * 3, 3)).double()


def data(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model[0], torch.nn.Conv2d):
        x = torch.randn(6, 1, 5, 5, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (6,), generator=g)


def exact_diagonal(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        ps = dict(zip(names, (t.view(s) for t, s in zip(flat.split(sizes), shapes))))
        return F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    H = torch.func.hessian(f)(flat0)
    return [d.view(s) for d, s in zip(H.diagonal().split(sizes), shapes)], H


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_hutchinson_converges_to_exact_diagonal(make):
    model = make()
    x, y = data(model)
    exact, H = exact_diagonal(model, x, y)
    params = list(model.parameters())
    hvp = HVP(lambda: F.cross_entropy(model(x), y), params)
    exact_flat = torch.cat([e.reshape(-1) for e in exact])
    # n-probe estimates from one stream = running means of single probes; check that too
    rng = PhiloxStream(seed=2024)
    singles = [torch.cat([d.reshape(-1) for d in hutchinson_diagonal(hvp, params, rng)]) for _ in range(8)]
    eight = hutchinson_diagonal(hvp, params, PhiloxStream(seed=2024), n_samples=8)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in eight]), torch.stack(singles).mean(0))
    singles += [torch.cat([d.reshape(-1) for d in hutchinson_diagonal(hvp, params, rng)]) for _ in range(248)]
    running = torch.stack(singles).cumsum(0)
    # RMS error of the mean of n probes: sqrt(sum_{i != j} H_ij^2 / n)
    off = (H - torch.diag(H.diagonal())).square().sum().sqrt().item()
    errs = {n: (running[n - 1] / n - exact_flat).norm().item() for n in (4, 16, 64, 256)}
    for n, e in errs.items():
        assert 0.25 * off / math.sqrt(n) < e < 4.0 * off / math.sqrt(n), (n, e, off / math.sqrt(n))
    assert errs[256] < errs[16]
    assert 4.0 / 3 < errs[4] / errs[256] < 8.0 * 3  # ~ sqrt(64) = 8


def test_hutchinson_exact_on_diagonal_quadratic():
    a = [torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64), torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)]
    xs = [torch.randn_like(t, requires_grad=True) for t in a]
    closure = lambda: sum(0.5 * (ai * xi * xi).sum() for ai, xi in zip(a, xs))
    est = hutchinson_diagonal(HVP(closure, xs), xs, PhiloxStream(3), n_samples=1)
    for e, ai in zip(est, a):
        torch.testing.assert_close(e, ai, rtol=0, atol=1e-14)


# ------------------------------------------------------------------ plain implementation of the paper
SHAPES = [(5,), (3, 4), (4, 2, 3), (3, 2, 3, 3), (2, 2, 2, 2, 3)]


def make_params():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=g, dtype=torch.float64).mul_(0.5).requires_grad_() for s in SHAPES]


def coupled_loss(params):
    # non-separable so that the Hessian has off-diagonal terms inside and across tensors
    s = sum((torch.sin(p) * (i + 1)).sum() for i, p in enumerate(params))
    return 0.1 * s * s + sum((p ** 4).sum() + (p[..., :1] * p[..., -1:]).sum() for p in params)


def plain_adahessian(params, steps, seed, lr, betas, eps, wd, k, update_each, block, abs_first):
    """The paper's update written out directly (eqs. 3, 8-10), probes from PhiloxStream(seed)."""
    b1, b2 = betas
    rng = PhiloxStream(seed)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    h = 0
    for t in range(1, steps + 1):
        loss = coupled_loss(params)
        g = torch.autograd.grad(loss, params, create_graph=True)
        due = (t - 1) % update_each == 0
        if due:
            z = [torch.empty_like(p) for p in params]
            rng.rademacher_(z, fused=False)
            hz = torch.autograd.grad(g, params, z)
            h += 1
        with torch.no_grad():
            for i, p in enumerate(params):
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                if due:
                    D = z[i] * hz[i]
                    if p.dim() >= 3:
                        dims = tuple(range(2, p.dim()))
                        Ds = D.abs().mean(dims, keepdim=True) if abs_first else D.mean(dims, keepdim=True).abs()
                        Ds = Ds.expand_as(D)
                    elif block:
                        f = D.reshape(-1)
                        Ds = torch.empty_like(f)
                        for j in range(0, f.numel(), block):
                            Ds[j:j + block] = f[j:j + block].abs().mean() if abs_first else f[j:j + block].mean().abs()
                        Ds = Ds.view_as(D)
                    else:
                        Ds = D.abs()
                    v[i] = b2 * v[i] + (1 - b2) * Ds * Ds
                mh = m[i] / (1 - b1 ** t)
                vh = v[i] / (1 - b2 ** h)
                p.sub_(lr * (mh / (vh.sqrt() ** k + eps) + wd * p))
    return params


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("cfg", [dict(), dict(update_each=3), dict(block_size=2, abs_before_average=False),
                                 dict(hessian_power=0.5, weight_decay=0.01, abs_before_average=False)])
def test_matches_plain_implementation(cfg, fused):
    kw = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-4, weight_decay=0.0, hessian_power=1.0, update_each=1,
              block_size=None, abs_before_average=True)
    kw.update(cfg)
    ps = make_params()
    opt = AdaHessian(ps, seed=11, fused=fused, **kw)
    for _ in range(7):
        opt.step(lambda: coupled_loss(ps))
    ref = plain_adahessian(make_params(), 7, 11, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
                           kw["hessian_power"], kw["update_each"], kw["block_size"], kw["abs_before_average"])
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert opt.counters["hvps"] == opt.counters["hessian_updates"] == len(range(0, 7, kw["update_each"]))


@pytest.mark.parametrize("fused", FUSED)
def test_drop_in_matches_closure(fused):
    a, b = make_params(), make_params()
    oa, ob = AdaHessian(a, lr=0.05, seed=3, fused=fused, n_samples=2), AdaHessian(b, lr=0.05, seed=3, fused=fused,
                                                                                  n_samples=2)
    for _ in range(4):
        oa.step(lambda: coupled_loss(a))
        ob.zero_grad()
        coupled_loss(b).backward(create_graph=ob.needs_create_graph)
        ob.step()
        assert all(p.grad.grad_fn is None for p in b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_drop_in_without_graph_errors():
    ps = make_params()
    coupled_loss(ps).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        AdaHessian(ps).step()


# ------------------------------------------------------------------ no graph alive after step
@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_no_graph_alive_after_closure_step(hvp):
    model = tiny_cnn()
    x, y = data(model)
    opt = AdaHessian(model.parameters(), hvp=hvp, seed=0)
    refs = []

    def closure():
        h = model[0](x)
        refs.append(weakref.ref(h))  # an activation saved for backward by tanh
        return F.cross_entropy(model[3](model[2](torch.tanh(h))), y)

    for _ in range(2):
        opt.step(closure)
    gc.collect()
    assert refs and all(r() is None for r in refs)
    assert all(p.grad is None for p in model.parameters())


def test_no_graph_alive_after_drop_in_step():
    model = tiny_cnn()
    x, y = data(model)
    opt = AdaHessian(model.parameters(), seed=0)
    h = model[0](x)
    ref = weakref.ref(h)
    loss = F.cross_entropy(model[3](model[2](torch.tanh(h))), y)
    loss.backward(create_graph=True)
    del h, loss
    opt.step()
    gc.collect()
    assert ref() is None
    assert all(p.grad.grad_fn is None for p in model.parameters())


# ------------------------------------------------------------------ update_each, NaN, state
def test_update_each_counts_and_reuses_second_moment():
    ps = make_params()
    opt = AdaHessian(ps, lr=0.01, update_each=4, seed=1)
    vs = []
    for _ in range(9):
        opt.step(lambda: coupled_loss(ps))
        vs.append(opt.state[ps[0]]["exp_hessian_diag_sq"].clone())
    assert opt.counters["hvps"] == 3 and opt.counters["gradients"] == 9
    assert torch.equal(vs[0], vs[3]) and not torch.equal(vs[3], vs[4]) and torch.equal(vs[4], vs[7])
    assert int(opt.state[ps[0]]["hessian_step"]) == 3 and int(opt.state[ps[0]]["step"]) == 9


def test_nonfinite_gradient_or_hessian_skips_step():
    ps = make_params()
    opt = AdaHessian(ps, lr=0.01, seed=1)
    opt.step(lambda: coupled_loss(ps))
    snap = copy.deepcopy(opt.state_dict()["state"])
    before = [p.detach().clone() for p in ps]
    opt.step(lambda: coupled_loss(ps) * float("nan"))
    # finite gradient, infinite Hessian: |x|^1.5 at x = 0
    with torch.no_grad():
        ps[0][0] = 0.0
    before[0][0] = 0.0
    opt.step(lambda: coupled_loss(ps) + ps[0][0].abs() ** 1.5)
    assert opt.counters["skipped_steps"] == 2 and opt.counters["steps"] == 1
    for a, b in zip(ps, before):
        assert torch.equal(a, b)
    after = opt.state_dict()["state"]
    for i in snap:
        for key in snap[i]:
            assert torch.equal(snap[i][key], after[i][key])
    opt.step(lambda: coupled_loss(ps))
    assert all(torch.isfinite(p).all() for p in ps)


def _roundtrip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_bit_identical():
    ps = make_params()
    opt = AdaHessian(ps, lr=0.02, update_each=2, seed=5)
    for _ in range(3):
        opt.step(lambda: coupled_loss(ps))
    sd = _roundtrip(opt)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = AdaHessian(qs, lr=0.5, update_each=2, seed=99)  # lr comes back from the state_dict
    opt2.load_state_dict(sd)
    for _ in range(4):
        opt.step(lambda: coupled_loss(ps))
        opt2.step(lambda: coupled_loss(qs))
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ hybrid
def test_hybrid_switches_exactly_below_threshold_and_matches_components():
    ps, qs = make_params(), make_params()
    hyb = HybridSGDAdaHessian(ps, switch_threshold=1.0, sgd_lr=0.005, momentum=0.9, lr=0.001, seed=4)
    sgd = torch.optim.SGD(qs, lr=0.005, momentum=0.9)
    for loss in (3.0, 1.5, 1.0):  # 1.0 is not below tl = 1.0
        for _ in range(2):
            hyb.step(lambda: coupled_loss(ps))
            sgd.zero_grad()
            coupled_loss(qs).backward()
            sgd.step()
        assert hyb.report_validation_loss(torch.tensor(loss)) is False
        assert hyb.phase == "sgd" and hyb.switch_step is None
    for a, b in zip(ps, qs):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert hyb.report_validation_loss(0.999) is True
    assert (hyb.phase, hyb.switch_step, hyb.switch_epoch) == ("adahessian", 6, 4)
    assert hyb.report_validation_loss(5.0) is False and hyb.phase == "adahessian"  # no switching back
    ada = AdaHessian([q.detach().clone().requires_grad_() for q in qs], lr=0.001, seed=4)
    rs = ada.param_groups[0]["params"]
    for _ in range(3):
        hyb.step(lambda: coupled_loss(ps))
        ada.step(lambda: coupled_loss(rs))
    for a, b in zip(ps, rs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert hyb.counters["sgd_steps"] == 6 and hyb.counters["hvps"] == 3


@pytest.mark.parametrize("switch_after", [None, 2])
def test_hybrid_state_dict_round_trip(switch_after):
    ps = make_params()
    opt = HybridSGDAdaHessian(ps, seed=8, lr=0.01)
    for i in range(4):
        opt.step(lambda: coupled_loss(ps))
        if switch_after is not None and i == switch_after:
            opt.report_validation_loss(0.1)
    sd = _roundtrip(opt)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    opt2 = HybridSGDAdaHessian(qs, seed=1)
    opt2.load_state_dict(sd)
    assert (opt2.phase, opt2.switch_step, opt2.switch_epoch) == (opt.phase, opt.switch_step, opt.switch_epoch)
    for i in range(4):
        if i == 1:
            opt.report_validation_loss(0.5)
            opt2.report_validation_loss(0.5)
        opt.step(lambda: coupled_loss(ps))
        opt2.step(lambda: coupled_loss(qs))
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
    assert opt2.phase == "adahessian"


# ------------------------------------------------------------------ torch.optim conformity
def test_param_groups_scheduler_and_fp32_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(27, 2))
    x, y = torch.randn(32, 1, 5, 5), torch.randint(0, 2, (32,))
    opt = AdaHessian([{"params": model[0].parameters(), "lr": 0.05}, {"params": model[3].parameters()}], lr=0.1,
                     seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5)
    closure = lambda: F.cross_entropy(model(x), y)
    first = closure().item()
    for _ in range(15):
        opt.step(closure)
        sched.step()
    assert closure().item() < 0.85 * first
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 8)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.float32
    copy.deepcopy(opt)


@pytest.mark.parametrize("kw,name", [(dict(lr=-1), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=0), "eps"),
                                     (dict(hessian_power=1.5), "hessian_power"), (dict(update_each=0), "update_each"),
                                     (dict(n_samples=0), "n_samples"), (dict(block_size=0), "block_size"),
                                     (dict(hvp="magic"), "hvp"), (dict(weight_decay=-0.1), "weight_decay")])
def test_invalid_hyperparameters(kw, name):
    with pytest.raises(ValueError, match=name):
        AdaHessian(make_params(), **kw)


def test_invalid_hybrid_hyperparameters():
    with pytest.raises(ValueError, match="sgd_lr"):
        HybridSGDAdaHessian(make_params(), sgd_lr=0)
    with pytest.raises(ValueError, match="momentum"):
        HybridSGDAdaHessian(make_params(), momentum=1.0)


def test_step_without_closure_or_grads():
    ps = make_params()
    with pytest.raises(RuntimeError, match="no closure"):  # issue 19: README's RuntimeError, not a no-op
        AdaHessian(ps).step()


@pytest.mark.skipif(not (torch.cuda.is_available() and len(FUSED) == 2
                         and __import__("natasha_ext").ops.fused_available("cuda")), reason="needs CUDA kernels")
@pytest.mark.parametrize("cfg", [dict(), dict(update_each=2, n_samples=2, block_size=2, abs_before_average=False)])
def test_cuda_fused_matches_reference(cfg):
    """AdaHessian on CUDA: fused kernels vs the pure-PyTorch path, same probes."""
    runs = []
    for fused in (True, False):
        ps = [p.detach().cuda().requires_grad_() for p in make_params()]
        opt = AdaHessian(ps, lr=0.05, seed=3, fused=fused, **cfg)
        for _ in range(5):
            opt.step(lambda: coupled_loss(ps))
        runs.append([p.detach().cpu() for p in ps])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_cli_entries_and_hybrid_epoch_end_hook():
    """The training CLI's 'adahessian'/'hybrid' entries: paper defaults, and the Hybrid's epoch_end
    hook reports the epoch's validation loss (the switch happens at the first one below tl)."""
    from types import SimpleNamespace

    from natasha_ext import train

    model = torch.nn.Linear(3, 2)
    opt, spec = train.make_optimizer("adahessian", model)
    assert isinstance(opt, AdaHessian) and spec.closure == "loss" and opt.param_groups[0]["lr"] == 0.1
    opt, spec = train.make_optimizer("hybrid", model, update_each=2)
    assert isinstance(opt, HybridSGDAdaHessian) and opt.update_each == 2
    g = opt.param_groups[0]
    assert (g["sgd_lr"], g["momentum"], g["lr"], opt.switch_threshold) == (0.005, 0.9, 0.001, 1.0)
    for epoch, val in ((1, 1.7), (2, 1.0), (3, 0.8), (4, 0.5)):
        spec.epoch_end(opt, SimpleNamespace(metrics={"val_loss": val, "train_loss": 0.1}, epoch=epoch))
        assert opt.phase == ("sgd" if epoch < 3 else "adahessian")
    assert opt.switch_epoch == 3
