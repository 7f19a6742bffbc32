"""EKFAC against curvlinops' ``EKFACLinearOperator`` (George et al. 2018's eigenvalue-corrected
K-FAC, empirical Fisher, KFC "expand", weight and bias in one block), in fp64 on the models and
losses of the K-FAC cross-check (an MLP, a CNN with two Conv2d layers) and a Linear layer shared
over a sequence axis (the L > 1 per-example path outside convolutions).

natasha_ext's statistics are read after two EKFAC steps on the batch with ``lr=0`` (the
parameters stay where curvlinops sees them) and ``stat_decay=0``: the first builds the eigenbasis
of the batch's factors, the second (no refresh due) replaces s* by the batch's per-example
estimate in that basis. The direction is the parameter change of that second step with lr = 1,
no momentum, no KL clip: -(F_EKFAC + gamma I)^-1 grad. curvlinops scales its Fisher by ``curvlinops_ratio`` relative to
natasha_ext's (the factor the K-FAC cross-check documents for G; s* carries the same one).

Checked: (1) s* equals curvlinops' corrected eigenvalues entry by entry (both bases come from eigh
of the same factors; s* does not depend on the eigenvectors' signs, nor on the basis chosen in
the factors' null spaces, where every per-example gradient projects to 0); (2) the EKFAC operators agree
on random vectors (independent of the basis representation); (3) the preconditioned direction
equals curvlinops' exactly damped inverse applied to the gradient.
"""
import pytest
import torch
import torch.nn as nn

from natasha_ext.optim import EKFAC
from tests.optim.test_kfac_crosscheck import LOSSES, MODELS, OUT, TOL, _layers, _problem, curvlinops, requires_curvlinops


class _Shared(nn.Module):
    """(B, 12) -> (B, 4, 3) -> Linear(3, 5) at each of 4 positions -> tanh -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(20, OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.reshape(x.shape[0], 4, 3))).flatten(1))


EKFAC_MODELS = {**MODELS, "shared": (_Shared, (12,))}
CASES = [(m, l) for m in EKFAC_MODELS for l in LOSSES]
DAMPING = 1e-3


@pytest.fixture
def problem(monkeypatch):
    """(model, x, t) of the K-FAC cross-check's problem maker, which also knows EKFAC's models."""
    def make(model_name, loss_name):
        monkeypatch.setitem(MODELS, model_name, EKFAC_MODELS[model_name])
        return _problem(model_name, loss_name)
    return make


def two_steps(model, x, t, loss_name, lr=0.0):
    """An EKFAC after two steps on (x, t): lr 0, then ``lr`` (no momentum, no KL clip)."""
    loss = LOSSES[loss_name]
    opt = EKFAC(model, lr=0.0, momentum=0.0, damping=DAMPING, stat_decay=0.0, kl_clip=None,
                batch_averaged=loss.batch_averaged)
    for step_lr in (0.0, lr):
        opt.param_groups[0]["lr"] = step_lr
        opt.step(lambda: loss.fn(model(x), t))
    opt.remove_hooks()
    return opt


def natasha_ekfac(model, x, t, loss_name):
    """{layer name: (U_A, U_G, s*)} (parameters unchanged)."""
    opt = two_steps(model, x, t, loss_name)
    return {name: tuple(opt.state[m.weight][k] for k in ("ekfac_UA", "ekfac_UG", "ekfac_scale"))
            for name, m in _layers(model)}


def natasha_direction(model, x, t, loss_name):
    """The parameter change of the second step with lr 1 (model restored)."""
    before = [p.detach().clone() for p in model.parameters()]
    two_steps(model, x, t, loss_name, lr=1.0)
    step = [p.detach() - b for p, b in zip(model.parameters(), before)]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return step


def curvlinops_ekfac(model, x, t, loss_name):
    """curvlinops' EKFAC of the empirical Fisher, weight and bias in one block (computed now)."""
    op = curvlinops.EKFACLinearOperator(model, LOSSES[loss_name].curvlinops_loss, list(model.parameters()),
                                        [(x, t)], fisher_type="empirical", separate_weight_and_bias=False,
                                        check_deterministic=False)  # kfac_approx: "expand", the default
    op.compute_eigenvalue_correction()  # the factors and their eigenvectors first
    return op


def both(problem, model_name, loss_name):
    """(model, x, t, curvlinops' operator, natasha_ext's {layer: (U_A, U_G, s*)}, curvlinops' scale)."""
    model, x, t = problem(model_name, loss_name)
    return model, x, t, curvlinops_ekfac(model, x, t, loss_name), natasha_ekfac(model, x, t, loss_name), \
        LOSSES[loss_name].curvlinops_ratio["empirical"]


def _blocks(model, vecs):
    """Per layer, [dW | db] of a parameter-shaped list (the layer's block of the operator)."""
    by_param = dict(zip([id(p) for p in model.parameters()], vecs))
    out = {}
    for name, m in _layers(model):
        w = by_param[id(m.weight)].reshape(m.weight.shape[0], -1)
        out[name] = torch.cat([w, by_param[id(m.bias)].reshape(-1, 1)], 1) if m.bias is not None else w
    return out


@requires_curvlinops
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_corrected_eigenvalues_match_curvlinops(model_name, loss_name, problem):
    model, x, t, op, ours, ratio = both(problem, model_name, loss_name)
    sd = op.state_dict()
    for name, (ua, ug, s) in ours.items():
        ref = sd["corrected_eigenvalues"][name]
        if isinstance(ref, dict):  # a layer without bias: curvlinops keys its weight's block by position
            (ref,) = ref.values()
        assert s.dtype == torch.float64 and s.shape == ref.shape, name
        torch.testing.assert_close(s * ratio, ref, **TOL, msg=lambda m: f"s* of {name}: {m}")


@requires_curvlinops
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_ekfac_operator_matches_curvlinops(model_name, loss_name, problem):
    model, x, t, op, ours, ratio = both(problem, model_name, loss_name)
    g = torch.Generator().manual_seed(1)
    vecs = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    ref = _blocks(model, op @ vecs)
    for name, v in _blocks(model, vecs).items():
        ua, ug, s = ours[name]
        mine = ug @ ((ug.t() @ v @ ua) * s * ratio) @ ua.t()  # U diag(s*) U^T vec(V)
        torch.testing.assert_close(mine, ref[name], **TOL, msg=lambda m: f"EKFAC v of {name}: {m}")


@requires_curvlinops
@pytest.mark.parametrize("model_name,loss_name", CASES)
def test_preconditioned_direction_matches_curvlinops_inverse(model_name, loss_name, problem):
    model, x, t = problem(model_name, loss_name)
    loss = LOSSES[loss_name]
    grads = torch.autograd.grad(loss.fn(model(x), t), list(model.parameters()))
    op = curvlinops_ekfac(model, x, t, loss_name)
    ratio = loss.curvlinops_ratio["empirical"]
    # (F + gamma I)^-1 g = ratio (ratio F + ratio gamma I)^-1 g, curvlinops holding ratio F
    inv = curvlinops.KFACInverseLinearOperator(op, damping=ratio * DAMPING, use_exact_damping=True)
    ref = [ratio * r for r in inv @ [g.detach() for g in grads]]
    step = natasha_direction(model, x, t, loss_name)
    for i, (d, r) in enumerate(zip(step, ref)):
        torch.testing.assert_close(-d, r, **TOL, msg=lambda m: f"direction of parameter {i}: {m}")
