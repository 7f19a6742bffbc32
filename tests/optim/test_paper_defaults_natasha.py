"""Natasha1.5 / Natasha2 defaults pinned to the papers: Allen-Zhu, "Natasha 2: Faster non-convex
optimization than SGD", NeurIPS 2018, as written out by Liu, Liu, Liu & Li, "Implementing and
evaluating Natasha2 with PyTorch" (Columbia University project report, undated; "report" below).
Changing a default must change this file and README's 'Defaults and the papers' table."""
import inspect
import math

import torch

from natasha_ext.cli_optimizers import OPTIMIZERS
from natasha_ext.optim import Natasha2, Natasha15


def _default(cls, name):
    return inspect.signature(cls.__init__).parameters[name].default


def test_natasha15_step_sizes_are_the_reports_appendix_numbers():
    # report, appendix ("Natasha 1: alpha = 0.01, B = 27, p = 9, sigma = 0.5"); Allen-Zhu's Alg. 1
    # lines 2-9 give B, p, alpha, sigma only as Theta(.) of epsilon and delta
    for cls in (Natasha15, Natasha2):
        assert _default(cls, "lr") == 0.01
        assert _default(cls, "epoch_size") == 27
        assert _default(cls, "subepochs") == 9
        assert _default(cls, "sigma") == 0.5


def test_natasha15_default_is_alg1_variance_reduced_with_mu_from_B_minibatches():
    # report Alg. 1 line 29: grad f_i(x_t) - grad f_i(x~) + mu + 2 sigma (x_t - x^);
    # line 24: mu = (1/B) sum_{i in S} grad f_i(x~), |S| = B  (snapshot_batches=None means B)
    assert _default(Natasha15, "variance_reduction") is True
    assert _default(Natasha15, "snapshot_batches") is None
    x = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = Natasha15([x])
    for _ in range(26):  # B - 1 calls: only gathering mu
        opt.step(lambda: (x ** 2).sum())
    assert torch.equal(x.detach(), torch.ones(2, dtype=torch.float64)) and opt.position["snap"] == 26
    opt.step(lambda: (x ** 2).sum())
    assert opt.position["snap"] == 27 and not torch.equal(x.detach(), torch.ones(2, dtype=torch.float64))


def test_natasha2_defaults_are_alg1():
    # report Alg. 1 (the faithful algorithm); Alg. 3-4 are the report's simplification
    assert _default(Natasha2, "variant") == "faithful"
    # report Sec. 3.3 "we set V = L = L2 = 1"; kick y_k +- (delta/L2) v (Sec. 1, Alg. 1 line 20 with L2 = 1)
    assert _default(Natasha2, "L") == 1.0 and _default(Natasha2, "L2") == 1.0
    # Alg. 1 line 14 uses the Hessian itself ('auto': exact for a closure that returns the loss, finite
    # differences only for one that calls backward); Alg. 4 (q = 0.0001) is the finite-difference version
    assert _default(Natasha2, "hvp") == "auto" and _default(Natasha2, "fd_eps") == 1e-4
    # Alg. 1 line 15: O(1/delta^2) Oja iterations, taken as 1/delta^2 (Sec. 3.3, Alg. 3 line 6)
    assert _default(Natasha2, "oja_iters") is None
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert Natasha2(p).oja_iterations() == math.ceil(1 / _default(Natasha2, "delta") ** 2)
    # Alg. 1 line 19 tests v^T grad^2 f(y_k) v on the full Hessian: estimated on a fresh minibatch
    assert _default(Natasha2, "kick_test_batches") == 1
    # Alg. 1 line 16 keeps eta fixed: a broken eta |lambda_max| <= 1 is reported, not repaired
    assert _default(Natasha2, "eta_check") == "warn"
    assert _default(Natasha2, "snapshot_batches") is None  # line 24, as Natasha15


def test_natasha2_delta_and_eta_have_no_paper_value_and_are_the_packages():
    # neither paper gives numbers (Allen-Zhu: delta is the target accuracy, eta from the theory;
    # the report advises delta >= 0.05, Sec. 4.2); README's table states these as the package's
    assert _default(Natasha2, "delta") == 0.1
    assert _default(Natasha2, "eta") == 0.1


def test_report_experiment_presets_are_the_reports_runs():
    # report Sec. 4.1 / Fig. 3: Natasha1.5 ran as Alg. 2 (plain gradient + sigma (x - x^)) with the
    # appendix's numbers; Natasha2 as Alg. 4 (finite differences, q = 1e-4, quotient on Oja's batch)
    p = [torch.nn.Parameter(torch.zeros(2))]
    g = Natasha15.report_experiment(p).param_groups[0]
    assert (g["lr"], g["sigma"], g["epoch_size"], g["subepochs"], g["variance_reduction"]) == (0.01, 0.5, 27, 9, False)
    g = Natasha2.report_experiment(p, delta=0.2).param_groups[0]
    assert (g["variant"], g["hvp"], g["fd_eps"], g["kick_test_batches"], g["delta"]) == (
        "simplified", "finite_difference", 1e-4, 0, 0.2)


def test_cli_natasha_flags_default_to_the_class():
    # the training CLI states no Natasha default of its own (cli_optimizers: Flag.default unset)
    for name, cls in (("natasha15", Natasha15), ("natasha2", Natasha2)):
        spec = OPTIMIZERS[name]
        for flag, f in spec.flags.items():
            assert not f.why, (name, flag)
            arg = f.arg or flag
            want = _default(cls, arg)
            got = spec.default(flag)
            assert got == want or (want is None and got == f.none), (name, flag, got, want)
