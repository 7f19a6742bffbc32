"""TrustRegion / ARC defaults pinned to their papers (changing a default must change this file).

TR: "Adaptive norms for deep learning with regularized Newton methods" (2019), Alg. 1 and eqs. 2-3.
ARC: Cartis, Gould & Toint, "Adaptive cubic regularisation methods for unconstrained
optimization. Part I" (2011), Alg. 2.1. Where a paper names a range and no number, the test pins
the chosen number and checks it lies in the paper's range."""
import inspect
import math

import torch

from natasha_ext.optim import ARC, TrustRegion


def defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


TR = defaults(TrustRegion)
ARC_D = defaults(ARC)


def test_tr_radius_update_is_alg1_line8_two_tiers():
    # Alg. 1 line 8: Delta x gamma when rho >= eta, Delta / gamma otherwise; no third tier.
    assert TR["eta_very_successful"] is None


def test_tr_radius_has_no_cap():
    # Alg. 1 has no Delta_max.
    assert TR["max_radius"] == math.inf


def test_tr_eta_gamma_radius0_in_alg1_ranges():
    # Alg. 1 line 1: gamma > 1, 1 > eta > 0, Delta_0 > 0 (no numbers in the paper's text).
    assert TR["gamma"] == 2.0 and TR["gamma"] > 1
    assert TR["eta"] == 0.01 and 0 < TR["eta"] < 1
    assert TR["radius"] == 1e-4 and TR["radius"] > 0


def test_tr_norm_is_the_rmsprop_ellipsoid():
    # Alg. 1 line 5: A_t := diag(A_rms,t), eq. 3, beta in (0, 1), eps > 0 (eq. 3; Lemma 2 needs eps > 0).
    assert TR["norm"] == "rmsprop"
    assert TR["beta"] == 0.8 and 0 < TR["beta"] < 1
    assert TR["eps"] == 1e-8 and TR["eps"] > 0


def test_tr_gradient_is_zeroed_only_when_it_vanishes():
    # Alg. 1 line 4: ||g|| <= eps_g sets g := 0; the paper's eps_g is the target accuracy, not a number.
    assert TR["grad_tol"] == 0.0
    assert TR["curvature"] == "hessian"  # B_t approximates the Hessian (eq. 7)


def test_arc_defaults_in_alg_2_1_ranges_and_norm_of_the_trust_region():
    # Alg. 2.1: sigma_0 > 0, 0 < eta1 <= eta2 < 1, gamma > 1.
    assert ARC_D["sigma"] == 1.0
    assert (ARC_D["eta1"], ARC_D["eta2"]) == (0.1, 0.9) and 0 < ARC_D["eta1"] <= ARC_D["eta2"] < 1
    assert ARC_D["gamma"] == 2.0
    # the TR paper's footnote 5: the same matrix-induced norm for the cubic term (raw A of eq. 3).
    assert ARC_D["norm_scale"] == "raw"
    assert (ARC_D["norm"], ARC_D["beta"], ARC_D["eps"]) == (TR["norm"], TR["beta"], TR["eps"])


def test_practical_presets_change_only_the_named_settings():
    w = torch.zeros(2, requires_grad=True)
    tr = TrustRegion.practical([w]).param_groups[0]
    assert (tr["eta_very_successful"], tr["max_radius"]) == (0.95, 10.0)
    assert {k: v for k, v in tr.items() if k not in ("params", "eta_very_successful", "max_radius")} == \
        {k: v for k, v in TrustRegion([w]).param_groups[0].items()
         if k not in ("params", "eta_very_successful", "max_radius")}
    arc = ARC.practical([w]).param_groups[0]
    assert arc["norm_scale"] == "initial_mean"
    assert {k: v for k, v in arc.items() if k not in ("params", "norm_scale")} == \
        {k: v for k, v in ARC([w]).param_groups[0].items() if k not in ("params", "norm_scale")}
    assert TrustRegion.practical([w], max_radius=3.0).param_groups[0]["max_radius"] == 3.0  # overrides win
