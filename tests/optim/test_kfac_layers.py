"""K-FAC on every supported layer type: each trains (the loss decreases over 20 steps on a small
model using it, the layer K-FAC preconditioned, not in the fallback), the Fisher options leave the
training gradient alone, and the layer report, ``skip_layers`` and the construction warning for
unsupported modules say what happens to each module. The factors themselves are cross-checked
against curvlinops and ASDL in test_kfac_crosscheck.py."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import ANG, EKFAC, IFANG, KFAC

CLASSES = 3


class Tokens(nn.Module):
    """Token ids (B, T) -> Embedding -> mean over T -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def _seq(*mods):
    return nn.Sequential(*mods)


# name -> (model maker, input shape or 'tokens', the name of the layer under test)
LAYERS = {
    "linear": (lambda: _seq(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES)), (6,), "0"),
    "conv1d-same-circular": (lambda: _seq(nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"), nn.Tanh(),
                                          nn.Flatten(), nn.Linear(32, CLASSES)), (2, 8), "0"),
    "conv1d-depthwise": (lambda: _seq(nn.Conv1d(4, 4, 3, padding=1, groups=4), nn.Tanh(), nn.Flatten(),
                                      nn.Linear(32, CLASSES)), (4, 8), "0"),
    "conv2d-same-reflect-dilated": (lambda: _seq(nn.Conv2d(2, 4, 3, padding="same", dilation=2, padding_mode="reflect"),
                                                 nn.Tanh(), nn.Flatten(), nn.Linear(64, CLASSES)), (2, 4, 4), "0"),
    "conv2d-grouped": (lambda: _seq(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(), nn.Flatten(),
                                    nn.Linear(24, CLASSES)), (4, 4, 4), "0"),
    "conv3d": (lambda: _seq(nn.Conv3d(2, 3, 2, padding=1, padding_mode="replicate"), nn.Tanh(), nn.Flatten(),
                            nn.Linear(192, CLASSES)), (2, 3, 3, 3), "0"),
    "embedding": (Tokens, "tokens", "emb"),
    "layernorm": (lambda: _seq(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, CLASSES)), (6,), "1"),
    "rmsnorm": (lambda: _seq(nn.Linear(6, 8), nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, CLASSES)), (6,), "1"),
    "groupnorm": (lambda: _seq(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                               nn.Linear(64, CLASSES)), (2, 4, 4), "1"),
    "batchnorm1d": (lambda: _seq(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, CLASSES)), (6,), "1"),
    "batchnorm2d": (lambda: _seq(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                                 nn.Linear(64, CLASSES)), (2, 4, 4), "1"),
}


def _data(in_shape, n=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 11, (n, 5), generator=g) if in_shape == "tokens" else torch.randn(n, *in_shape, generator=g)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


def _train(opt, model, x, y, steps=20):
    losses = []
    for _ in range(steps):
        losses.append(float(opt.step(lambda: F.cross_entropy(model(x), y))))
    with torch.no_grad():
        return losses[0], float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda m: KFAC(m, lr=0.1, damping=1e-2, cov_every=1, inv_every=5, seed=0), id="kfac-mc"),
    pytest.param(lambda m: ANG.practical(m, lr=0.1, damping=1e-2, cov_every=1, inv_every=5, total_steps=40,
                                         fisher="type2"),
                 id="ang-type2"),
    pytest.param(lambda m: IFANG.practical(m, lr=0.1, damping=1e-2, rank=2, total_steps=40, fisher="empirical"),
                 id="ifang-empirical"),
    # EKFAC: eigen-corrected Linear/Conv blocks, the K-FAC blocks of LayerwiseCurvature for the rest
    pytest.param(lambda m: EKFAC(m, lr=0.1, damping=1e-2, inv_every=5, seed=0), id="ekfac"),
])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_type_trains_k_fac_preconditioned(layer, make_opt):
    make, in_shape, name = LAYERS[layer]
    torch.manual_seed(0)
    model = make()
    x, y = _data(in_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back: no warning
        opt = make_opt(model)
    assert name in opt.preconditioned and opt.fallback == {}, (opt.preconditioned, opt.fallback)
    first, last = _train(opt, model, x, y)
    assert opt.counters["factor_updates"] == 20
    assert last < 0.8 * first, (layer, first, last)


@pytest.mark.parametrize("fisher", ["mc", "type2"])
def test_fisher_passes_leave_the_training_gradient_alone(fisher):
    """The extra backward passes of 'mc' / 'type2' write no .grad: after loss.backward() the
    gradients are those of a model without an optimizer, and step(closure) sets the same."""
    make, in_shape, _ = LAYERS["batchnorm2d"]
    torch.manual_seed(0)
    model = make()
    x, y = _data(in_shape, n=8)
    params = list(model.parameters())
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    opt = KFAC(model, lr=0.0, momentum=0.0, cov_every=1, fisher=fisher, mc_samples=1)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r)
    opt.zero_grad()
    opt.step(lambda: F.cross_entropy(model(x), y))
    for p, r in zip(params, ref):
        assert torch.equal(p.grad, r)
    assert opt.counters["factor_updates"] == 1  # the Fisher passes did run and fed the factors


def test_mc_draws_follow_the_seed():
    """Same seed, same MC factors; another seed, other factors (the targets are sampled)."""
    make, in_shape, _ = LAYERS["linear"]
    x, y = _data(in_shape, n=8)
    got = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = make()
        opt = KFAC(model, lr=0.0, cov_every=1, seed=seed)
        opt.step(lambda: F.cross_entropy(model(x), y))
        got.append(opt.state[model[2].weight]["kfac_G"])
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])


def test_reports_skip_layers_and_warning_for_unsupported_modules():
    torch.manual_seed(0)
    model = _seq(nn.Linear(4, 6), nn.PReLU(6), nn.LayerNorm(6), nn.Linear(6, 5), nn.Embedding(5, 3, sparse=True))
    with pytest.warns(UserWarning, match=r"not K-FAC preconditioned.*'1 \(PReLU.*'4 \(Embedding\(sparse=True\)"):
        opt = KFAC(model)
    assert set(opt.preconditioned) == {"0", "2", "3"}
    assert "Kronecker A 5x5, G 6x6" in opt.preconditioned["0"] and "elementwise" in opt.preconditioned["2"]
    assert set(opt.fallback) == {"1", "4"} and "sparse" in opt.fallback["4"]
    assert "PReLU" in repr(opt)
    # every form of skip_layers: a type, a name, a regular expression; skipped modules do not warn
    for skip in ([nn.PReLU, nn.Embedding], ["1", "4"], [r"[14]"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt = KFAC(model, skip_layers=skip + ["2"])
        assert set(opt.preconditioned) == {"0", "3"}
        assert opt.fallback == {"1": "skipped: skip_layers", "2": "skipped: skip_layers", "4": "skipped: skip_layers"}


def test_argument_errors_name_the_argument():
    model = LAYERS["linear"][0]()
    for kw, name in ((dict(fisher="true"), "fisher"), (dict(likelihood="poisson"), "likelihood"),
                     (dict(mc_samples=0), "mc_samples"), (dict(fisher="type2", mc_samples=2), "mc_samples")):
        with pytest.raises(ValueError, match=name):
            KFAC(model, **kw)
        with pytest.raises(ValueError, match=name):
            IFANG(model, total_steps=3, **kw)
    with pytest.raises(TypeError, match="skip_layers"):
        KFAC(model, skip_layers=[3])
    with pytest.raises(ValueError, match="skip_layers"):
        KFAC(model, skip_layers=["("])


def test_likelihood_must_fit_the_model_output():
    torch.manual_seed(0)
    reg = _seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = KFAC(reg, cov_every=1)  # default: fisher='mc', likelihood='categorical'
    with pytest.raises(ValueError, match="likelihood='gaussian'"):
        opt.step(lambda: F.mse_loss(reg(x), y))
    opt = KFAC(reg, cov_every=1, likelihood="gaussian")
    opt.step(lambda: F.mse_loss(reg(x), y))
    assert opt.counters["factor_updates"] == 1

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x), x

    pair = Pair()
    opt = KFAC(pair, cov_every=1)
    with pytest.raises(TypeError, match="fisher='empirical'"):
        pair(x)
    opt = KFAC(pair, cov_every=1, fisher="empirical")  # the empirical Fisher needs no model output
    opt.step(lambda: pair(x)[0].square().mean())
    assert opt.counters["factor_updates"] == 1


def test_weight_tied_to_a_skipped_module_is_not_preconditioned():
    """An Embedding tied to the Linear head (different module types: refused, naming both); with
    one of them skipped the shared weight is left to SGD, not preconditioned from half its uses."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight
            self.mid = nn.Linear(4, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.mid(self.emb(x))))

    with pytest.raises(ValueError, match="'emb' and 'head' share their weight.*skip_layers"):
        KFAC(Tied())
    opt = KFAC(Tied(), skip_layers=["head"])
    assert set(opt.preconditioned) == {"mid"}
    assert opt.fallback == {"head": "skipped: skip_layers", "emb": "weight shared with a module in skip_layers"}


@pytest.mark.parametrize("factor_damping", [None, 0.05], ids=["gamma", "lam"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_step_curvature_of_the_natural_gradient_is_t_dot_u(layer, factor_damping):
    """The KL clip measures d^T F d of the step taken (LayerwiseCurvature.quadratic_form); for
    U = F^-1 T that is <T, U>, for every layer structure and both damping forms."""
    make, in_shape, name = LAYERS[layer]
    torch.manual_seed(0)
    model = make().double()
    x, y = _data(in_shape)
    x = x.double() if x.is_floating_point() else x
    damping = dict(damping=0.01) if factor_damping is None else dict(factor_damping=factor_damping)
    opt = ANG.practical(model, cov_every=1, inv_every=1, total_steps=4, fisher="type2", **damping)
    opt.step(lambda: F.cross_entropy(model(x), y))
    idx = [i for i, lay in enumerate(opt._layers) if lay.name == name]
    assert idx, name
    g = torch.Generator().manual_seed(1)
    ts = []
    for i in idx:
        lay = opt._layers[i]
        ts.append(lay.grad_matrix(torch.randn(lay.weight.shape, generator=g, dtype=torch.float64),
                                  None if lay.bias is None else torch.randn(lay.bias.shape, generator=g,
                                                                            dtype=torch.float64), torch.float64))
    us, red = opt._precondition(idx, ts)
    states = opt._layer_states()
    q = opt.curvature.quadratic_form(us, [states[i] for i in idx], [opt._factor_damping(i) for i in idx])
    torch.testing.assert_close(q, red[:, 0].to(q.dtype), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda m: KFAC(m, lr=0.05, cov_every=1, inv_every=1, seed=0), id="kfac"),
    pytest.param(lambda m: IFANG(m, lr=0.05, rank=2, total_steps=4, seed=0), id="ifang"),
])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_statistics_stay_in_the_accumulation_dtype_under_autocast(layer, make_opt):
    """step() inside a bf16 autocast region: the hooks' low-rank means and the optimizer's algebra
    (grouped / embedding / norm blocks, inverses) are not autocast, so every state tensor is fp32
    (grouped convs stored bf16 factors before)."""
    make, in_shape, name = LAYERS[layer]
    torch.manual_seed(0)
    model = make()
    x, y = _data(in_shape)
    opt = make_opt(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: F.cross_entropy(model(x), y))
    states = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert states and all(v.dtype == torch.float32 for v in states), {v.dtype for v in states}
