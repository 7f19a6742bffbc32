"""natasha_ext's K-FAC factors against the field's reference implementations: curvlinops'
``KFACLinearOperator`` (Dangel et al., curvlinops-for-pytorch) and ASDL's empirical-Fisher
Kronecker factors (Osawa et al., ASDL / asdfghjkl), on every layer type natasha_ext's K-FAC
preconditions today (Linear with and without bias, Conv2d groups=1 with stride and padding).

natasha_ext computes the *empirical* Fisher (the gradients of the training loss at the observed
targets) in the KFC "expand" form of Grosse & Martens, "A Kronecker-factored approximate Fisher
matrix for convolution layers", 2016: with B examples, L output positions per example (1 for
Linear), a the layer input (unfolded patch for Conv2d, in F.unfold order C, kh, kw) with a trailing
1 when the layer has a bias, and g the per-example gradient w.r.t. the layer output,

    A = (1/(B L)) sum_{b,l} a a^T,        G = (1/B) sum_{b,l} g g^T.

Convention map (checked below to 1e-10 in fp64):

* curvlinops, ``fisher_type="empirical", kfac_approx="expand", separate_weight_and_bias=False``:
  ``input_covariances`` is A including the bias column (appended last, as here);
  ``gradient_covariances`` is G for cross-entropy with reduction="mean" (curvlinops rescales the
  output gradients by N^2/N), B * G for reduction="sum" (curvlinops approximates the Fisher of
  the summed loss, natasha_ext with ``batch_averaged=False`` the per-example average), and C * G
  for MSELoss with reduction="mean" over C outputs (curvlinops multiplies that loss by sqrt(C);
  natasha_ext keeps the 1/C of torch's mean).
* ASDL, ``FISHER_EMP`` with ``SHAPE_KRON`` (it expects a summed loss and divides by ``data_size``):
  ``kron.A`` is A *without* the bias column (ASDL keeps the bias outside the Kronecker factor) and
  ``kron.B`` is G when natasha_ext's loss is the batch mean (cross-entropy) or the sum
  (``batch_averaged=False``) of the per-example losses ASDL sums, and C^2 * G for MSELoss with
  reduction="mean" (whose per-example loss carries a 1/C that ASDL's summed loss does not).

natasha_ext's factors are read from the public optimizer: the first factor update of a layer
stores the current batch's statistic (its EMA starts there, whatever ``stat_decay``), and with
``cov_every=1`` that update happens on the first step.
"""
import importlib
from functools import partial
from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import KFAC
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
    curvlinops_loss: nn.Module
    curvlinops_ratio: float  # curvlinops' G / natasha_ext's G
    asdl_fn: Callable       # the loss for ASDL, which calls it with reduction="sum"
    asdl_ratio: float       # ASDL's G / natasha_ext's G


LOSSES = {
    "ce-mean": Loss(F.cross_entropy, True, nn.CrossEntropyLoss(), 1, F.cross_entropy, 1),
    "mse-sum": Loss(partial(F.mse_loss, reduction="sum"), False, nn.MSELoss(reduction="sum"), BATCH, F.mse_loss, 1),
    # torch's mean MSE also averages over the OUT outputs: natasha_ext's G is the Fisher of that
    # per-example loss; curvlinops rescales the loss by sqrt(OUT), ASDL takes the summed loss
    "mse-mean": Loss(F.mse_loss, True, nn.MSELoss(), OUT, F.mse_loss, OUT ** 2),
}


def _problem(model_name, loss_name):
    make, in_shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(BATCH, *in_shape, dtype=torch.float64)
    if loss_name.startswith("ce"):
        t = torch.randint(0, OUT, (BATCH,))
    else:
        t = torch.randn(BATCH, OUT, dtype=torch.float64)
    return model, x, t


def _layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def natasha_factors(model, x, t, loss_name, fused=None):
    """{layer name: (A, G)} after one KFAC step on (x, t); the parameters are left unchanged."""
    loss = LOSSES[loss_name]
    opt = KFAC(model, lr=0.0, momentum=0.0, stat_decay=0.0, cov_every=1, inv_every=1, kl_clip=None,
               batch_averaged=loss.batch_averaged, fused=fused)
    opt.step(lambda: loss.fn(model(x), t))
    out = {name: (opt.state[m.weight]["kfac_A"].clone(), opt.state[m.weight]["kfac_G"].clone())
           for name, m in _layers(model)}
    opt.remove_hooks()
    return out


def curvlinops_factors(model, x, t, loss_name):
    """{layer name: (A with bias column, G as curvlinops scales it)}."""
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(model, LOSSES[loss_name].curvlinops_loss, params, [(x, t)],
                                       fisher_type="empirical", kfac_approx="expand",
                                       separate_weight_and_bias=False, check_deterministic=False)
    op.compute_kronecker_factors()
    sd = op.state_dict()
    return {name: (sd["input_covariances"][name], sd["gradient_covariances"][name]) for name, _ in _layers(model)}


def asdl_factors(model, x, t, loss_name):
    """{layer name: (A without bias column, G)} from ASDL's empirical Fisher (summed loss / data_size)."""
    maker = asdl.get_fisher_maker(model, asdl.FisherConfig(fisher_type=asdl.FISHER_EMP, fisher_shapes=[asdl.SHAPE_KRON],
                                                           data_size=BATCH))
    y = maker.setup_model_call(model, x)
    maker.setup_loss_call(LOSSES[loss_name].asdl_fn, y, t)
    maker.forward_and_backward()
    return {name: (m.fisher.kron.A, m.fisher.kron.B) for name, m in _layers(model)}


CASES = [(m, l) for m in MODELS for l in LOSSES]


@requires_curvlinops
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)], ids=["reference", "fused"])
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_factors_match_curvlinops_kfac_expand_empirical(model_name, loss_name, fused):
    model, x, t = _problem(model_name, loss_name)
    ref = curvlinops_factors(model, x, t, loss_name)
    ours = natasha_factors(model, x, t, loss_name, fused=fused)
    g_scale = LOSSES[loss_name].curvlinops_ratio
    assert ours.keys() == ref.keys()
    for name, (a, g) in ours.items():
        a_ref, g_ref = ref[name]
        assert a.dtype == torch.float64 and a.shape == a_ref.shape, name
        torch.testing.assert_close(a, a_ref, **TOL, msg=lambda m: f"A of {name}: {m}")
        torch.testing.assert_close(g * g_scale, g_ref, **TOL, msg=lambda m: f"G of {name}: {m}")


# ASDL registers module backward hooks that torch deprecates; the statistics it reads are unaffected
@pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
@requires_asdl
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_factors_match_asdl_empirical_fisher_kron(model_name, loss_name):
    model, x, t = _problem(model_name, loss_name)
    ref = asdl_factors(model, x, t, loss_name)
    ours = natasha_factors(model, x, t, loss_name)
    for name, m in _layers(model):
        a, g = ours[name]
        a_ref, g_ref = ref[name]
        n_in = m.weight[0].numel()
        assert a.shape[0] == n_in + (m.bias is not None), name
        torch.testing.assert_close(a[:n_in, :n_in], a_ref, **TOL, msg=lambda s: f"A of {name}: {s}")
        torch.testing.assert_close(g * LOSSES[loss_name].asdl_ratio, g_ref, **TOL, msg=lambda s: f"G of {name}: {s}")
