"""natasha_ext's Hutchinson diagonal (``natasha_ext.curvature.hutchinson``, the estimator
AdaHessian uses: Yao et al., "ADAHESSIAN: an adaptive second order optimizer for machine
learning", 2021, eq. 8; Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
2007) against curvlinops' exact Hessian (``HessianLinearOperator``, Dangel et al.,
curvlinops-for-pytorch) and curvlinops' own ``hutchinson_diag``, in fp64 on a small MLP.

For a Rademacher probe z, s = z * (H z) has E[s_i] = H_ii and Var[s_i] = sum_{j != i} H_ij^2, so
the average of n probes lies within a few standard errors sqrt(Var / n) of the exact diagonal.
The probes are drawn from a seeded Philox stream (natasha_ext) or a seeded torch generator
(curvlinops), so every bound below is checked on one fixed, reproducible draw.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext import ops
from natasha_ext.curvature import HVP
from natasha_ext.curvature.hutchinson import hutchinson_diagonal, rademacher_probe
from tests.helpers import requires_fused

curvlinops = pytest.importorskip("curvlinops",
                                 reason="curvlinops-for-pytorch not installed (tools/bootstrap.sh installs it)")

N_PROBES = 400
SEED = 1234
Z_BOUND = 5.0  # standard errors


@pytest.fixture(scope="module")
def problem():
    """(params, closure, curvlinops' Hessian operator, exact Hessian H as a dense fp64 matrix)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    t = torch.randint(0, 4, (10,))
    params = list(model.parameters())
    op = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, t)])
    H = op @ torch.eye(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)  # the dense matrix really is a Hessian
    return params, (lambda: F.cross_entropy(model(x), t)), op, H


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.fixture(scope="module")
def samples(problem):
    """[N_PROBES, D] matrix of natasha_ext's single-probe estimates z * (H z) (probes from a
    Philox stream seeded with SEED; HVP + ops.hutchinson_diag, what hutchinson_diagonal averages)."""
    params, closure, op, H = problem
    hvp, rng, rows = HVP(closure, params), ops.PhiloxStream(SEED), []
    for _ in range(N_PROBES):
        z, offset = rademacher_probe(params, rng)
        rows.append(_flat(ops.hutchinson_diag(hvp(z), rng.seed, offset)))
    return torch.stack(rows)


FUSED = pytest.mark.parametrize("fused", [False, pytest.param(True, marks=requires_fused)], ids=["reference", "fused"])


@FUSED
def test_single_probe_is_z_times_curvlinops_hessian_times_z(problem, fused):
    """Deterministic: natasha_ext's HVP + kernel on a probe equal z * (H z) with curvlinops' H."""
    params, closure, op, H = problem
    hvp = HVP(closure, params)
    rng = ops.PhiloxStream(SEED)
    for _ in range(3):
        z, offset = rademacher_probe(params, rng, fused=fused)
        zf = _flat(z)
        assert set(zf.unique().tolist()) == {-1.0, 1.0}
        est = _flat(ops.hutchinson_diag(hvp(z), rng.seed, offset, fused=fused))
        torch.testing.assert_close(est, zf * (H @ zf), rtol=1e-10, atol=1e-10)


def test_diagonal_estimate_within_standard_errors_of_curvlinops_exact_diagonal(problem, samples):
    params, closure, op, H = problem
    exact = H.diagonal()
    mean = samples.mean(0)
    # the estimator's own spread agrees with the theory's: Var[s_i] = sum_{j != i} H_ij^2
    sample_var = samples.var(0)
    exact_var = (H ** 2).sum(1) - exact ** 2
    assert abs(sample_var.sum() / exact_var.sum() - 1) < 0.15, (sample_var.sum(), exact_var.sum())
    se = (sample_var / N_PROBES).sqrt()
    z_scores = (mean - exact).abs() / (se + 1e-15)
    assert bool((z_scores < Z_BOUND).all()), f"max |z| = {z_scores.max():.2f} at {int(z_scores.argmax())}"
    # the estimate is informative: far closer to the exact diagonal than a single probe is
    assert (mean - exact).norm() < 0.2 * (samples[0] - exact).norm()


@FUSED
def test_hutchinson_diagonal_averages_the_same_probes(problem, samples, fused):
    """The public entry point draws its probes from the stream in the same order and averages them."""
    params, closure, op, H = problem
    n = 25
    diag = hutchinson_diagonal(HVP(closure, params), params, ops.PhiloxStream(SEED), n_samples=n, fused=fused)
    torch.testing.assert_close(_flat(diag), samples[:n].mean(0), rtol=1e-10, atol=1e-12)


def test_diagonal_estimate_agrees_with_curvlinops_hutchinson_diag(problem, samples):
    """Two independent Hutchinson estimates of the same diagonal (natasha_ext's Philox probes,
    curvlinops' torch-generator probes) differ by less than Z_BOUND standard errors of their
    difference, sqrt(2 Var / n), with Var from the exact Hessian."""
    params, closure, op, H = problem
    exact = H.diagonal()
    exact_var = (H ** 2).sum(1) - exact ** 2
    ours = samples.mean(0)
    # curvlinops takes fewer matvecs than the dimension per call: average equal-sized calls
    per_call = 80
    torch.manual_seed(SEED)
    theirs = torch.stack([curvlinops.hutchinson_diag(op, per_call) for _ in range(N_PROBES // per_call)]).mean(0)
    se = (exact_var / N_PROBES).sqrt()
    assert bool(((theirs - exact).abs() < Z_BOUND * se + 1e-12).all())
    diff_bound = Z_BOUND * 2 ** 0.5 * se + 1e-12
    ratio = (ours - theirs).abs() / diff_bound
    assert bool((ratio < 1).all()), f"max |difference| / bound = {ratio.max():.2f}"
