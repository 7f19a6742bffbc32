"""natasha_ext's K-FAC statistics against the field's reference implementations: curvlinops'
``KFACLinearOperator`` / ``EFLinearOperator`` / ``GGNLinearOperator`` (Dangel et al.,
curvlinops-for-pytorch) and ASDL's Kronecker factors (Osawa et al., ASDL / asdfghjkl), for every
layer type natasha_ext's K-FAC preconditions and each ``fisher`` ('empirical', 'mc', 'type2'),
in fp64 to 1e-10.

natasha_ext's factors are the KFC "expand" form of Grosse & Martens, "A Kronecker-factored
approximate Fisher matrix for convolution layers", 2016: with B examples, L output positions per
example (1 for Linear), a the layer input (unfolded patch for convs, in F.unfold order C, k...)
with a trailing 1 when the layer has a bias, and g the per-example gradient w.r.t. the layer
output (of the training loss for 'empirical'; of -log p(y|f) at sampled y for 'mc', averaged over
the samples; of the loss Hessian's square-root columns for 'type2', summed over them),

    A = (1/(B L)) sum_{b,l} a a^T,        G = (1/B) sum_{b,l} g g^T.

Convention map (each checked below):

* curvlinops, ``kfac_approx="expand", separate_weight_and_bias=False``: ``input_covariances`` is A
  including the bias column (appended last, as here); ``gradient_covariances`` is G for
  cross-entropy with reduction="mean", B * G for reduction="sum" (curvlinops approximates the
  Fisher of the summed loss, natasha_ext with ``batch_averaged=False`` the per-example average).
  For MSELoss with reduction="mean" over C outputs: C * G for 'empirical' (curvlinops multiplies
  that loss by sqrt(C); natasha_ext keeps the 1/C of torch's mean in the gradient it hooks) and
  G / C for 'mc' / 'type2' (curvlinops takes the GGN of that loss, Hessian (2/C) I per example;
  natasha_ext's likelihood='gaussian' that of the squared error summed over the outputs, 2 I). 'mc' draws the same targets from the same seed (``KFAC(seed=s)``,
  ``KFACLinearOperator(seed=s)``: the same ``multinomial`` / ``randn`` calls on the same generator).
* ASDL (``SHAPE_KRON``; it expects a summed loss and divides by ``data_size``): ``kron.A`` is A
  *without* the bias column, ``kron.B`` is G for 'empirical' (times C^2 for MSELoss mean) and for
  'type2' (``FISHER_EXACT``) with cross-entropy; for MSE ASDL's likelihood is 0.5 ||f - y||^2
  (Hessian I), natasha_ext's ||f - y||^2 (Hessian 2I): G = 2 * kron.B.

Layers curvlinops' K-FAC does not take (Conv1d/3d, padding modes and 'same', grouped convs,
Embedding) are checked through an equivalent model it does take, whose outputs are asserted equal
to the original's first: a conv is torch's own conv module with one-hot kernels (same padding,
padding mode, stride, dilation) producing the patches, followed by one ``nn.Linear`` per group on
them (weight sharing over positions: the "expand" case); an Embedding is ``nn.Linear`` on one-hot
token rows (whose A is exactly diagonal, the token frequencies). Norm layers' elementwise Fisher
is checked against the diagonal of curvlinops' exact empirical Fisher / GGN of their parameters
(the per-example gradients of affine parameters are exact, also for BatchNorm in training mode:
the loss of example b reaches them only through its own output).

natasha_ext's statistics are read from the public optimizer after one step with lr=0,
``stat_decay=0`` and ``cov_every=1`` (the factors of that batch).
"""
import copy
import importlib
import math
from functools import partial
from types import SimpleNamespace
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import IFANG, KFAC
from tests.helpers import requires_fused


def _optional(module, package):
    """(module or None, skip marker naming the package to install)."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = None
    return mod, pytest.mark.skipif(mod is None, reason=f"{package} not installed (tools/bootstrap.sh installs it)")


curvlinops, requires_curvlinops = _optional("curvlinops", "curvlinops-for-pytorch")
asdl, requires_asdl = _optional("asdl", "asdfghjkl (module asdl)")

TOL = dict(rtol=1e-10, atol=1e-10)
BATCH = 6
OUT = 3  # model outputs (classes / regression targets)
SEED = 2147483647  # curvlinops' default seed; ours is KFAC(seed=...)
FISHERS = ["empirical", "mc", "type2"]
CURVLINOPS_FISHER = {"empirical": "empirical", "mc": "mc", "type2": "type-2"}


def _mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, OUT, bias=False))


def _cnn():
    # Conv2d with bias, stride 2, padding 1; Conv2d without bias, rectangular kernel, stride
    # (1, 2), padding (1, 0); a Linear head: (B, 2, 7, 7) -> (B, 3, 4, 4) -> (B, 4, 5, 1) -> (B, 3)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(1, 0), bias=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(20, OUT))


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (2, 7, 7))}


class Loss(NamedTuple):
    fn: Callable            # the loss natasha_ext's closure returns
    batch_averaged: bool    # KFAC's batch_averaged for it
    likelihood: str
    curvlinops_loss: nn.Module
    curvlinops_ratio: dict  # fisher -> curvlinops' G / natasha_ext's G
    asdl_fn: Callable       # the loss for ASDL, which calls it with reduction="sum"
    asdl_ratio: dict        # fisher -> ASDL's G / natasha_ext's G


LOSSES = {
    "ce-mean": Loss(F.cross_entropy, True, "categorical", nn.CrossEntropyLoss(),
                    dict(empirical=1, mc=1, type2=1), F.cross_entropy, dict(empirical=1, type2=1)),
    "mse-sum": Loss(partial(F.mse_loss, reduction="sum"), False, "gaussian", nn.MSELoss(reduction="sum"),
                    dict(empirical=BATCH, mc=BATCH, type2=BATCH), F.mse_loss, dict(empirical=1, type2=0.5)),
    # torch's mean MSE also averages over the OUT outputs (see the module docstring)
    "mse-mean": Loss(F.mse_loss, True, "gaussian", nn.MSELoss(), dict(empirical=OUT, mc=1 / OUT, type2=1 / OUT),
                     F.mse_loss, dict(empirical=OUT ** 2)),
}


def _inputs(in_shape, loss_name, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *in_shape, dtype=torch.float64, generator=g)
    if loss_name.startswith("ce"):
        t = torch.randint(0, OUT, (BATCH,), generator=g)
    else:
        t = torch.randn(BATCH, OUT, dtype=torch.float64, generator=g)
    return x, t


def _problem(model_name, loss_name):
    make, in_shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make().double()
    return (model,) + _inputs(in_shape, loss_name)


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def natasha_state(model, x, t, loss_name, fisher, fused=None, mc_samples=1, **kw):
    """{weight: optimizer state} after one KFAC step on (x, t) with lr=0 (the parameters are
    left unchanged): the statistics of that batch."""
    loss = LOSSES[loss_name]
    opt = KFAC(model, lr=0.0, momentum=0.0, stat_decay=0.0, cov_every=1, inv_every=1, kl_clip=None,
               batch_averaged=loss.batch_averaged, fused=fused, fisher=fisher, likelihood=loss.likelihood,
               mc_samples=mc_samples, seed=SEED, **kw)
    opt.step(lambda: loss.fn(model(x), t))
    opt.remove_hooks()
    return opt


def natasha_factors(model, x, t, loss_name, fisher="empirical", fused=None, mc_samples=1):
    """{layer name: (A, G)} of the Kronecker layers after one KFAC step on (x, t)."""
    opt = natasha_state(model, x, t, loss_name, fisher, fused, mc_samples)
    return {name: (opt.state[m.weight]["kfac_A"].clone(), opt.state[m.weight]["kfac_G"].clone())
            for name, m in _layers(model)}


def curvlinops_operator(model, x, t, loss_name, fisher, mc_samples=1):
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(model, LOSSES[loss_name].curvlinops_loss, params, [(x, t)],
                                       fisher_type=CURVLINOPS_FISHER[fisher], mc_samples=mc_samples, seed=SEED,
                                       kfac_approx="expand", separate_weight_and_bias=False,
                                       check_deterministic=False)
    op.compute_kronecker_factors()
    sd = op.state_dict()
    return sd["input_covariances"], sd["gradient_covariances"]


def curvlinops_factors(model, x, t, loss_name, fisher="empirical", mc_samples=1):
    """{layer name: (A with bias column, G as curvlinops scales it)}."""
    a, g = curvlinops_operator(model, x, t, loss_name, fisher, mc_samples)
    return {name: (a[name], g[name]) for name, _ in _layers(model)}


def asdl_factors(model, x, t, loss_name, fisher="empirical"):
    """{layer name: (A without bias column, G)} from ASDL (summed loss / data_size)."""
    fisher_type = {"empirical": asdl.FISHER_EMP, "type2": asdl.FISHER_EXACT}[fisher]
    loss_type = asdl.LOSS_CROSS_ENTROPY if loss_name.startswith("ce") else asdl.LOSS_MSE
    maker = asdl.get_fisher_maker(model, asdl.FisherConfig(fisher_type=fisher_type, fisher_shapes=[asdl.SHAPE_KRON],
                                                           data_size=BATCH, loss_type=loss_type))
    y = maker.setup_model_call(model, x)
    maker.setup_loss_call(LOSSES[loss_name].asdl_fn, y, t)
    maker.forward_and_backward()
    return {name: (m.fisher.kron.A, m.fisher.kron.B) for name, m in _layers(model)}


# ------------------------------------------------------------------ Linear / Conv2d
CASES = [(m, l) for m in MODELS for l in LOSSES]


@requires_curvlinops
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)], ids=["reference", "fused"])
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_factors_match_curvlinops_kfac_expand(model_name, loss_name, fisher, fused):
    model, x, t = _problem(model_name, loss_name)
    mc = 3 if fisher == "mc" else 1
    ref = curvlinops_factors(model, x, t, loss_name, fisher, mc_samples=mc)
    ours = natasha_factors(model, x, t, loss_name, fisher, fused=fused, mc_samples=mc)
    g_scale = LOSSES[loss_name].curvlinops_ratio[fisher]
    assert ours.keys() == ref.keys()
    for name, (a, g) in ours.items():
        a_ref, g_ref = ref[name]
        assert a.dtype == torch.float64 and a.shape == a_ref.shape, name
        torch.testing.assert_close(a, a_ref, **TOL, msg=lambda m: f"A of {name}: {m}")
        torch.testing.assert_close(g * g_scale, g_ref, **TOL, msg=lambda m: f"G of {name}: {m}")


ASDL_CASES = [(m, l, f) for m, l in CASES for f in LOSSES[l].asdl_ratio]


# ASDL registers module backward hooks that torch deprecates; the statistics it reads are unaffected
@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@requires_asdl
@pytest.mark.parametrize("model_name,loss_name,fisher", ASDL_CASES)
def test_factors_match_asdl_fisher_kron(model_name, loss_name, fisher):
    model, x, t = _problem(model_name, loss_name)
    ref = asdl_factors(model, x, t, loss_name, fisher)
    ours = natasha_factors(model, x, t, loss_name, fisher)
    for name, m in _layers(model):
        a, g = ours[name]
        a_ref, g_ref = ref[name]
        n_in = m.weight[0].numel()
        assert a.shape[0] == n_in + (m.bias is not None), name
        torch.testing.assert_close(a[:n_in, :n_in], a_ref, **TOL, msg=lambda s: f"A of {name}: {s}")
        torch.testing.assert_close(g * LOSSES[loss_name].asdl_ratio[fisher], g_ref, **TOL,
                                   msg=lambda s: f"G of {name}: {s}")


@pytest.mark.parametrize("fisher", FISHERS)
def test_ifang_rank_b_low_rank_factors_are_the_dense_factors(fisher):
    """IFANG with one example per row group and no shared positions (Linear, rank = B) has
    YA^T YA = A and YG^T YG = G of the same Fisher: the low-rank statistics of each Fisher type
    (one s'-row block of YG per backpropagated vector) are scaled as the dense ones."""
    model, x, t = _problem("mlp", "ce-mean")
    mc = 2 if fisher == "mc" else 1
    dense = natasha_factors(model, x, t, "ce-mean", fisher, mc_samples=mc)
    opt = IFANG(model, lr=0.0, momentum=0.0, kl_clip=None, rank=BATCH, fisher=fisher, mc_samples=mc, seed=SEED)
    opt.step(lambda: F.cross_entropy(model(x), t))
    for name, m in _layers(model):
        st = opt.state[m.weight]
        a, g = dense[name]
        torch.testing.assert_close(st["kfac_YA"].T @ st["kfac_YA"], a, **TOL)
        torch.testing.assert_close(st["kfac_YG"].T @ st["kfac_YG"], g, **TOL)


def test_mc_fisher_converges_to_type2_in_expectation():
    """The MC estimate with many samples approaches the exact (type-2) factor: the relative
    Frobenius error of G shrinks like 1/sqrt(samples) (here < 0.1 with 400 samples)."""
    model, x, t = _problem("mlp", "ce-mean")
    exact = natasha_factors(model, x, t, "ce-mean", "type2")
    few = natasha_factors(model, x, t, "ce-mean", "mc", mc_samples=4)
    many = natasha_factors(model, x, t, "ce-mean", "mc", mc_samples=400)
    for name in exact:
        g = exact[name][1]
        err_few = ((few[name][1] - g).norm() / g.norm()).item()
        err_many = ((many[name][1] - g).norm() / g.norm()).item()
        assert err_many < 0.1 and err_many < err_few, (name, err_few, err_many)


# ------------------------------------------------------------------ conv variants, grouped convs, embeddings
class PatchLinear(nn.Module):
    """A conv as torch's own conv module with one-hot kernels (the patches: its padding, padding
    mode, stride, dilation) followed by one nn.Linear per group over them."""

    def __init__(self, conv):
        super().__init__()
        c, n = conv.in_channels, conv.weight.dim() - 2
        k = math.prod(conv.kernel_size)
        self.patches = type(conv)(c, c * k, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                  dilation=conv.dilation, groups=c, bias=False,
                                  padding_mode=conv.padding_mode).to(conv.weight.dtype)
        with torch.no_grad():
            eye = torch.eye(k, dtype=conv.weight.dtype).reshape(k, 1, *conv.kernel_size)
            self.patches.weight.copy_(eye.repeat(c, 1, *([1] * n)))
        self.patches.weight.requires_grad_(False)
        self.groups, og = conv.groups, conv.out_channels // conv.groups
        self.linears = nn.ModuleList()
        for g in range(conv.groups):
            lin = nn.Linear(conv.weight[0].numel(), og, bias=conv.bias is not None).to(conv.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(conv.weight[g * og:(g + 1) * og].reshape(og, -1))
                if conv.bias is not None:
                    lin.bias.copy_(conv.bias[g * og:(g + 1) * og])
            self.linears.append(lin)

    def forward(self, x):
        p = self.patches(x)                              # (B, C*K, O...)
        spatial = p.shape[2:]
        p = p.flatten(2).transpose(1, 2)                 # (B, L, C*K)
        parts = p.chunk(self.groups, dim=2)
        y = torch.cat([lin(part) for lin, part in zip(self.linears, parts)], 2)  # (B, L, out)
        return y.transpose(1, 2).reshape(y.shape[0], -1, *spatial)


class OneHotLinear(nn.Module):
    """An Embedding as nn.Linear (no bias) on one-hot token rows."""

    def __init__(self, emb):
        super().__init__()
        self.num = emb.num_embeddings
        self.linear = nn.Linear(emb.num_embeddings, emb.embedding_dim, bias=False).to(emb.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(emb.weight.T)

    def forward(self, idx):
        return self.linear(F.one_hot(idx, self.num).to(self.linear.weight.dtype))


class SeqHead(nn.Module):
    """(B, T, D) -> mean over T -> Linear."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, OUT)

    def forward(self, h):
        return self.lin(torch.tanh(h).mean(1))


def _conv_net(conv, in_shape):
    torch.manual_seed(0)
    conv = conv.double()
    with torch.no_grad():
        n_out = conv(torch.zeros(1, *in_shape, dtype=torch.float64)).numel()
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_out, OUT)).double()


CONVS = {
    "conv1d-same-circular-dilated": (lambda: nn.Conv1d(2, 3, 3, padding="same", dilation=2, padding_mode="circular"),
                                     (2, 9)),
    "conv1d-depthwise-stride": (lambda: nn.Conv1d(3, 6, 2, stride=2, padding=1, groups=3, bias=False), (3, 8)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"), (2, 5, 6)),
    "conv2d-replicate-stride-dilation": (lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), padding=2, dilation=(1, 2),
                                                           padding_mode="replicate"), (2, 6, 7)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 3, 4, 4)),
    "conv3d-grouped-same-zeros": (lambda: nn.Conv3d(2, 4, 2, padding="same", groups=2, bias=False), (2, 3, 3, 3)),
}


def _our_blocks(opt, weight, groups):
    """[(A, G)] per group from natasha_ext's state of the layer with this weight."""
    st = opt.state[weight]
    if "kfac_A" in st:
        return [(st["kfac_A"], st["kfac_G"])]
    return [(st["kfac_group_A"][g], st["kfac_group_G"][g]) for g in range(groups)]


@requires_curvlinops
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("conv_name", sorted(CONVS))
def test_conv_variants_match_curvlinops_on_patch_linear_model(conv_name, fisher):
    make, in_shape = CONVS[conv_name]
    model = _conv_net(make(), in_shape)
    ref_model = copy.deepcopy(model)
    ref_model[0] = PatchLinear(model[0])
    x, t = _inputs(in_shape, "ce-mean")
    torch.testing.assert_close(ref_model(x), model(x), rtol=1e-12, atol=1e-12)  # the same function
    a_ref, g_ref = curvlinops_operator(ref_model, x, t, "ce-mean", fisher)
    opt = natasha_state(model, x, t, "ce-mean", fisher)
    conv = model[0]
    assert opt.fallback == {} and "0" in opt.preconditioned
    blocks = _our_blocks(opt, conv.weight, conv.groups)
    assert len(blocks) == conv.groups
    for g, (a, gg) in enumerate(blocks):
        torch.testing.assert_close(a, a_ref[f"0.linears.{g}"], **TOL, msg=lambda s: f"A of group {g}: {s}")
        torch.testing.assert_close(gg, g_ref[f"0.linears.{g}"], **TOL, msg=lambda s: f"G of group {g}: {s}")
    head = opt.state[model[3].weight]  # the layers after it see the same statistics too
    torch.testing.assert_close(head["kfac_G"], g_ref["3"], **TOL)


@requires_curvlinops
@pytest.mark.parametrize("fisher", FISHERS)
def test_embedding_matches_curvlinops_on_one_hot_linear_model(fisher):
    torch.manual_seed(0)
    vocab, dim, seq = 7, 4, 5
    model = nn.Sequential(nn.Embedding(vocab, dim), SeqHead(dim)).double()
    ref_model = copy.deepcopy(model)
    ref_model[0] = OneHotLinear(model[0])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab - 1, (BATCH, seq), generator=g)  # token vocab-1 never occurs: A_vv = 0
    t = torch.randint(0, OUT, (BATCH,), generator=g)
    torch.testing.assert_close(ref_model(x), model(x), rtol=1e-12, atol=1e-12)
    a_ref, g_ref = curvlinops_operator(ref_model, x, t, "ce-mean", fisher)
    opt = natasha_state(model, x, t, "ce-mean", fisher)
    st = opt.state[model[0].weight]
    # curvlinops' dense A of one-hot rows is exactly the diagonal of the token frequencies
    torch.testing.assert_close(torch.diag(st["kfac_token_A"]), a_ref["0.linear"], **TOL)
    torch.testing.assert_close(st["kfac_token_G"], g_ref["0.linear"], **TOL)
    assert st["kfac_token_A"][-1] == 0


# ------------------------------------------------------------------ norm layers (elementwise Fisher)
class Tokens(nn.Module):
    """(B, 4, 3) -> Linear per position -> norm over the last dim -> flatten -> Linear."""

    def __init__(self, norm):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, 6), norm, nn.Linear(24, OUT)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))).flatten(1))


def _bn_eval():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return bn.eval()


NORMS = {
    "layernorm": (lambda: Tokens(nn.LayerNorm(6)), (4, 3), "norm"),
    "layernorm-no-bias": (lambda: Tokens(nn.LayerNorm(6, bias=False)), (4, 3), "norm"),
    "rmsnorm": (lambda: Tokens(nn.RMSNorm(6, eps=1e-6)), (4, 3), "norm"),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(36, OUT)), (2, 5, 5), "1"),
    # training-mode batch statistics (no running buffers: curvlinops' functorch passes refuse their update)
    "batchnorm2d-train": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                                                nn.Tanh(), nn.Flatten(),
                                                nn.Linear(36, OUT)), (2, 5, 5), "1"),
    "batchnorm2d-eval": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), _bn_eval(), nn.Tanh(), nn.Flatten(),
                                               nn.Linear(36, OUT)), (2, 5, 5), "1"),
    "batchnorm1d-train": (lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False),
                                                nn.Tanh(), nn.Linear(4, OUT)),
                          (5,), "1"),
}


def _curvlinops_diag(model, x, t, norm, fisher):
    """The diagonal of curvlinops' exact EF ('empirical'; also 'mc' at the targets curvlinops'
    own K-FAC draws from the same seed) or GGN ('type2') over the norm layer's parameters."""
    params = [p for p in norm.parameters()]
    if fisher == "mc":  # curvlinops' K-FAC sampler (it takes no norm layer itself), on its generator
        sampler = SimpleNamespace(_loss_func=nn.CrossEntropyLoss(), _generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            t = curvlinops.KFACLinearOperator.draw_label(sampler, model(x))
    cls = curvlinops.GGNLinearOperator if fisher == "type2" else curvlinops.EFLinearOperator
    op = cls(model, nn.CrossEntropyLoss(), params, [(x, t)], check_deterministic=False)
    n = sum(p.numel() for p in params)
    dense = op @ torch.eye(n, dtype=torch.float64)
    return torch.diagonal(dense).split([p.numel() for p in params])


@requires_curvlinops
@pytest.mark.parametrize("fisher", FISHERS)
@pytest.mark.parametrize("norm_name", sorted(NORMS))
def test_norm_elementwise_fisher_matches_curvlinops_diagonal(norm_name, fisher):
    make, in_shape, name = NORMS[norm_name]
    torch.manual_seed(0)
    model = make().double()
    x, t = _inputs(in_shape, "ce-mean")
    norm = model.get_submodule(name)
    ref = _curvlinops_diag(model, x, t, norm, fisher)
    opt = natasha_state(model, x, t, "ce-mean", fisher)
    assert name in opt.preconditioned and "elementwise" in opt.preconditioned[name]
    f = opt.state[norm.weight]["kfac_diag_F"]
    assert f.shape == (norm.weight.numel(), 1 + (getattr(norm, "bias", None) is not None))
    for col, r in zip(f.T, ref):
        torch.testing.assert_close(col, r, **TOL)
