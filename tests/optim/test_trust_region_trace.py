"""Algorithm traces: TrustRegion's radius sequence against Alg. 1 of "Adaptive norms for deep
learning with regularized Newton methods" (2019), and ARC's sigma sequence against Cartis, Gould &
Toint 2011, Alg. 2.1, with the cubic term in the same (raw) A as the trust region.

The problem is a quadratic, where the model is exact: m(0) - m(s) = L(w) - L(w + s) for the
trust region. The closure's trial evaluation (the one under ``torch.no_grad``, at w + s) returns
L(w) - rho_t (m(0) - m(s)) for a scripted rho_t, so every step's ratio is known in advance and the
expected radii / sigmas below are written out by hand from the algorithm boxes."""
import math

import pytest
import torch

from natasha_ext.optim import ARC, TrustRegion

pytestmark = pytest.mark.usefixtures("one_thread")

H = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
B = torch.tensor([30.0, -20.0, 10.0], dtype=torch.float64)
W0 = torch.tensor([3.0, 2.0, -4.0], dtype=torch.float64)


def f(w):
    return 0.5 * w @ (H @ w) + B @ w


def run_trace(opt, w, rhos, model_decrease):
    """Steps ``opt`` once per scripted ratio; returns [(weights before, weights after, trial point,
    radius or sigma after the step)].
    ``model_decrease(w_t, s)`` is m(0) - m(s) as the algorithm box defines it."""
    seen, log = {}, []
    for t, rho in enumerate(rhos):
        def closure():
            loss = f(w)
            if torch.is_grad_enabled():  # the gradient (and curvature) evaluation at w_t
                seen.update(w_t=w.detach().clone(), f_t=float(loss.detach()))
                return loss
            s = w.detach() - seen["w_t"]  # the trial evaluation at w_t + s
            seen["trial"] = w.detach().clone()
            return torch.tensor(seen["f_t"] - rho * model_decrease(seen["w_t"], s), dtype=torch.float64)
        opt.step(closure)
        log.append((seen["w_t"], w.detach().clone(), seen["trial"], getattr(opt, "radius", getattr(opt, "sigma", None))))
        assert opt.last_step["rho"] == pytest.approx(rho, rel=1e-9, abs=1e-12), f"step {t}"
    return log


def quadratic_decrease(w_t, s):
    return float(f(w_t) - f(w_t + s))


RHOS = [1.0, 0.5, 0.005, 0.3, -2.0, 0.97, 0.02]
ACCEPTED = [True, True, False, True, False, True, True]   # rho >= eta = 0.01


@pytest.mark.parametrize("practical,radius0,expected", [
    # Alg. 1 line 8, gamma = 2, eta = 0.01: x2 when rho >= eta, /2 otherwise, no cap.
    (False, 0.05, [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.4]),
    # TrustRegion.practical: x2 only when rho >= 0.95, kept when 0.01 <= rho < 0.95, /2 below 0.01.
    (True, 0.05, [0.1, 0.1, 0.05, 0.05, 0.025, 0.05, 0.05]),
    # ... and never above max_radius = 10.
    (True, 4.0, [8.0, 8.0, 4.0, 4.0, 2.0, 4.0, 4.0]),
])
def test_radius_sequence_follows_algorithm_1(practical, radius0, expected):
    w = W0.clone().requires_grad_(True)
    make = TrustRegion.practical if practical else TrustRegion
    opt = make([w], radius=radius0)
    radii = [radius for (_, _, _, radius) in run_trace(opt, w, RHOS, quadratic_decrease)]
    assert radii == expected


def test_accept_reject_and_weights_follow_algorithm_1():
    w = W0.clone().requires_grad_(True)
    opt = TrustRegion([w], radius=0.05)
    for t, (w_t, w_after, trial, _) in enumerate(run_trace(opt, w, RHOS, quadratic_decrease)):
        if ACCEPTED[t]:  # w_{t+1} = w_t + s_t
            assert torch.equal(w_after, trial), f"step {t}"
        else:            # w_{t+1} = w_t, bit for bit
            assert torch.equal(w_after, w_t), f"step {t}"
    assert opt.counters["accepted"] == sum(ACCEPTED) and opt.counters["rejected"] == len(RHOS) - sum(ACCEPTED)


def test_the_cap_stops_growth_and_the_uncapped_radius_stays_finite():
    w = W0.clone().requires_grad_(True)
    opt = TrustRegion.practical([w], radius=6.0)
    run_trace(opt, w, [1.0, 1.0], quadratic_decrease)
    assert opt.radius == 10.0
    w = W0.clone().requires_grad_(True)
    opt = TrustRegion([w], radius=1.5e308)  # Alg. 1 has no cap; growth stops short of inf
    run_trace(opt, w, [1.0], quadratic_decrease)
    assert opt.radius == 1.5e308


# ARC: rho = (L(w) - L(w + s)) / (L(w) - m(s)), m(s) = L(w) + g's + s'Hs/2 + sigma/3 ||s||_A^3 with
# A = diag(v + eps), v <- beta v + (1 - beta) g^2 (eq. 3), the norm of the trust region.
ARC_RHOS = [0.95, 0.5, 0.05, -1.0, 0.92, 0.3]
# Alg. 2.1 with gamma = 2, eta1 = 0.1, eta2 = 0.9, sigma_0 = 1: /2 when rho >= eta2, kept when
# eta1 <= rho < eta2, x2 (and rejected) when rho < eta1.
ARC_SIGMAS = [0.5, 0.5, 1.0, 2.0, 1.0, 1.0]
ARC_ACCEPTED = [True, True, False, False, True, True]


@pytest.mark.parametrize("norm_scale", ["raw", "initial_mean"])
def test_sigma_sequence_follows_alg_2_1_with_one_norm_for_the_cubic_term(norm_scale):
    """raw (default): the cubic term in A itself, the trust region's norm; initial_mean
    (ARC.practical): in A / mean(a_0), the normaliser fixed at the first step."""
    beta, eps = 0.8, 1e-8
    w = W0.clone().requires_grad_(True)
    opt = ARC([w], beta=beta, eps=eps, norm_scale=norm_scale)
    v = torch.zeros(3, dtype=torch.float64)
    sigma = [1.0]  # the sigma of the step being taken, from the hand-written list
    unit = []      # mean(a_0)

    def cubic_decrease(w_t, s):
        g = H @ w_t + B
        a = (v + eps) / (unit[0] if norm_scale == "initial_mean" else 1.0)
        return -float(g @ s + 0.5 * s @ (H @ s) + sigma[0] / 3 * float(s @ (a * s)) ** 1.5)

    sigmas, accepted = [], []
    for t, rho in enumerate(ARC_RHOS):
        w_t = w.detach().clone()
        v.mul_(beta).add_((1 - beta) * (H @ w_t + B) ** 2)  # eq. 3, once per iteration (Alg. 1 line 5)
        if not unit:
            unit.append(float((v + eps).mean()))
        run_trace(opt, w, [rho], cubic_decrease)
        sigmas.append(opt.sigma)
        accepted.append(not torch.equal(w.detach(), w_t))
        sigma[0] = ARC_SIGMAS[t]
    assert sigmas == ARC_SIGMAS
    assert accepted == ARC_ACCEPTED
    # mean(a) is far from 1 and moves (so neither A itself nor A / mean(a_t) would give these ratios)
    assert unit[0] > 100.0 and abs(float((v + eps).mean()) / unit[0] - 1) > 0.1
