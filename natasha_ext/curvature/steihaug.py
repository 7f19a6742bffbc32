"""Steihaug-Toint truncated CG in the A-norm (preconditioned CG, Conn, Gould & Toint 2000,
Alg. 7.5.1) for the trust-region subproblem of
"Adaptive norms for deep learning with regularized Newton methods" (anonymous, under double-blind review, 2019), eq. (7):

    min_s  m(s) = g^T s + 1/2 s^T B s    s.t.  ||s||_A = sqrt(s^T A s) <= radius,  A = diag(a).

With A as preconditioner the CG iterates grow monotonically in the A-norm, so the method stops
(i) on negative curvature p^T B p <= 0, following p to the boundary; (ii) when the next
iterate would leave the region, stopping on the boundary; (iii) when the relative residual
||r||_{A^-1} <= tol ||g||_{A^-1}; (iv) after max_iters. The first iterate is the Cauchy point
of the A-norm region (the minimiser of m along -A^{-1} g inside the region) and m decreases
monotonically along the iterates, so the step always achieves at least the Cauchy decrease;
the returned step is checked against it and replaced by the Cauchy point if rounding ever made
it worse.

The vector work runs in the fused ops of :mod:`natasha_ext.ops.trust_region`: per iteration one
curvature product, :func:`cg_dots` and :func:`cg_step_`, with one host sync (the branch on
p^T B p and on the boundary). The model value is tracked exactly by m(s + t p) = m(s) +
t r^T p + t^2/2 p^T B p. :func:`cubic_cg` is the same sweep for the cubic model of ARC.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from natasha_ext import ops


@dataclass
class CGResult:
    model: float          # m(s) (< 0 unless the gradient vanished); cubic model for cubic_cg
    iters: int            # curvature products spent
    reason: str           # 'converged' | 'boundary' | 'negative_curvature' | 'max_iters' | 'cauchy' | 'nonfinite' | ...
    norm_a: float         # ||s||_A
    cauchy_model: float   # m at the Cauchy point


def boundary_tau(sAs: float, sAp: float, pAp: float, radius: float) -> float:
    """tau >= 0 with ||s + tau p||_A = radius (positive root; s is inside the region)."""
    if pAp <= 0.0:
        return 0.0
    disc = max(sAp * sAp + pAp * (radius * radius - sAs), 0.0)
    return (-sAp + math.sqrt(disc)) / pAp


def _finite(*xs: float) -> bool:
    return all(math.isfinite(x) for x in xs)


def _worse_than_cauchy(m: float, cauchy_m: Optional[float], like: List[torch.Tensor]) -> bool:
    """True when the CG model value is above the Cauchy point's by more than rounding: both are
    built from the same list reductions (accumulated in the state dtype), so a step that *is* the
    Cauchy point (first iteration on the boundary) may differ from it in the last bits."""
    if cauchy_m is None:
        return False
    tol = 1024 * torch.finfo(like[0].dtype).eps * max(abs(m), abs(cauchy_m)) if like else 0.0
    return not m <= cauchy_m + tol


# The solvers are host-driven loops over Python scalars (one .tolist() per iteration decides the
# branch): under torch.compile they run eagerly. Traced, every scalar becomes a symbolic float
# whose guards (sqrt of the boundary root) fail on the frame that created them, and nothing
# would be gained: each iteration graph-breaks on its host sync and on autograd.grad anyway.
@torch.compiler.disable
def steihaug_cg(matvec: Callable[[List[torch.Tensor]], List[torch.Tensor]], grads: List[torch.Tensor],
                s: List[torch.Tensor], r: List[torch.Tensor], p: List[torch.Tensor], a: List[torch.Tensor],
                rz0: float, radius: float, max_iters: int = 50, tol: float = 0.1,
                fused: Optional[bool] = None) -> CGResult:
    """Run Steihaug-Toint PCG from the state left by :func:`ops.tr_cg_init_` (s = 0, r = g,
    p = -A^{-1} g, rz0 = g^T A^{-1} g). ``s`` receives the step; r and p are scratch."""
    if rz0 <= 0.0:
        return CGResult(0.0, 0, "zero_gradient", 0.0, 0.0)
    rz, sAs, sAp, pAp = rz0, 0.0, 0.0, rz0  # p0 = -z0 so p^T A p = r^T A^{-1} r
    m, iters, reason = 0.0, 0, "max_iters"
    cauchy_t = cauchy_m = None
    pending = None  # norms returned by the last cg_step_, read at the next sync
    stop_rz = (tol * tol) * rz0
    for k in range(max_iters):
        Bp = matvec(p)
        iters += 1
        dots = ops.cg_dots(p, Bp, r, a, fused=fused)
        if pending is not None:
            vals = torch.cat([dots, pending.to(dots.dtype)]).tolist()  # one host sync
            kappa, rp, u, w = vals[:4]
            rz, sAs, sAp, pAp = vals[4:]
        else:
            kappa, rp, u, w = dots.tolist()
        if not _finite(kappa, rp, u, w, rz, sAs, sAp, pAp):
            return CGResult(float("nan"), iters, "nonfinite", float("nan"), float("nan"))
        if k == 0:  # Cauchy point along p0 = -A^{-1} g: t <= radius / ||p0||_A
            t_b = radius / math.sqrt(rz0)
            cauchy_t = min(rz0 / kappa, t_b) if kappa > 0 else t_b
            cauchy_m = -cauchy_t * rz0 + 0.5 * cauchy_t * cauchy_t * kappa
        if kappa <= 0.0:
            tau, reason = boundary_tau(sAs, sAp, pAp, radius), "negative_curvature"
        else:
            alpha = rz / kappa
            if sAs + 2 * alpha * sAp + alpha * alpha * pAp >= radius * radius:
                tau, reason = boundary_tau(sAs, sAp, pAp, radius), "boundary"
            else:
                tau = None
        if tau is not None:
            ops.cg_step_(s, r, p, Bp, a, tau, 0.0, fused=fused)
            m += tau * rp + 0.5 * tau * tau * kappa
            sAs = sAs + 2 * tau * sAp + tau * tau * pAp
            break
        rz_next = max(rz + 2 * alpha * u + alpha * alpha * w, 0.0)  # r_{k+1}^T A^{-1} r_{k+1}
        pending = ops.cg_step_(s, r, p, Bp, a, alpha, rz_next / rz, fused=fused)
        m += alpha * rp + 0.5 * alpha * alpha * kappa
        if rz_next <= stop_rz:
            reason = "converged"
            break
    if pending is not None and reason in ("converged", "max_iters"):
        sAs = float(pending[1])
    if _worse_than_cauchy(m, cauchy_m, s):
        # Rounding made the CG step worse than the Cauchy point: take the Cauchy point.
        with torch.no_grad():
            for si, gi, ai in zip(s, grads, a):
                si.copy_(gi.to(si.dtype) / ai).mul_(-cauchy_t)
        return CGResult(cauchy_m, iters, "cauchy", cauchy_t * math.sqrt(rz0), cauchy_m)
    return CGResult(m, iters, reason, math.sqrt(max(sAs, 0.0)), cauchy_m if cauchy_m is not None else 0.0)


def _cubic_line_min(m0: float, rp: float, kappa: float, sigma: float, sAs: float, sAp: float,
                    pAp: float) -> float:
    """First local minimiser t >= 0 of phi(t) = m0 + t rp + t^2/2 kappa + sigma/3 N(t)^3 with
    N(t)^2 = sAs + 2 t sAp + t^2 pAp (bisection on phi'; 0 when phi'(0) >= 0)."""
    def dphi(t):
        n2 = max(sAs + 2 * t * sAp + t * t * pAp, 0.0)
        return rp + t * kappa + sigma * (sAp + t * pAp) * math.sqrt(n2)

    if dphi(0.0) >= 0.0:
        return 0.0
    hi = 1.0 / max(math.sqrt(pAp), 1e-300)
    for _ in range(200):
        if dphi(hi) > 0.0:
            break
        hi *= 2.0
    lo = 0.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if dphi(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return hi


def cubic_model_along(m_quad: float, rp: float, kappa: float, sigma: float, sAs: float, sAp: float,
                      pAp: float, t: float):
    """(quadratic part, ||s + t p||_A^2) after the move s += t p."""
    return m_quad + t * rp + 0.5 * t * t * kappa, sAs + 2 * t * sAp + t * t * pAp


@torch.compiler.disable
def cubic_cg(matvec, grads, s, r, p, a, rz0: float, sigma: float, max_iters: int = 50, tol: float = 0.1,
             fused: Optional[bool] = None) -> CGResult:
    """Truncated CG for the ARC model m(s) = g^T s + 1/2 s^T B s + sigma/3 ||s||_A^3: PCG on
    the quadratic part (the fused sweep) while the full CG step alpha still lowers the cubic
    model; otherwise (and on negative curvature, where the cubic term keeps the line model
    bounded) the exact 1-D minimiser of the cubic model along the current direction is taken
    and CG stops. The cubic model decreases monotonically along the iterates; the result is
    compared with the cubic Cauchy point (the line minimiser along -A^{-1} g) and replaced by it
    when worse, so the step always achieves at least the Cauchy decrease. A cheaper alternative
    to the Lanczos solver of :mod:`natasha_ext.curvature.lanczos` (no basis kept)."""
    if rz0 <= 0.0:
        return CGResult(0.0, 0, "zero_gradient", 0.0, 0.0)
    rz, sAs, sAp, pAp = rz0, 0.0, 0.0, rz0
    mq, iters, reason, pending = 0.0, 0, "max_iters", None
    cauchy_t = cauchy_m = None
    stop_rz = (tol * tol) * rz0
    cubic = lambda q, n2: q + sigma / 3 * max(n2, 0.0) ** 1.5
    for k in range(max_iters):
        Bp = matvec(p)
        iters += 1
        dots = ops.cg_dots(p, Bp, r, a, fused=fused)
        if pending is not None:
            vals = torch.cat([dots, pending.to(dots.dtype)]).tolist()
            kappa, rp, u, w = vals[:4]
            rz, sAs, sAp, pAp = vals[4:]
        else:
            kappa, rp, u, w = dots.tolist()
        if not _finite(kappa, rp, u, w, rz, sAs, sAp, pAp):
            return CGResult(float("nan"), iters, "nonfinite", float("nan"), float("nan"))
        t_star = _cubic_line_min(mq, rp, kappa, sigma, sAs, sAp, pAp)
        if k == 0:
            cauchy_t = t_star
            cauchy_m = cubic(*cubic_model_along(0.0, rp, kappa, sigma, 0.0, 0.0, pAp, t_star))
        now = cubic(mq, sAs)
        alpha = rz / kappa if kappa > 0 else math.inf
        take_cg = kappa > 0 and cubic(*cubic_model_along(mq, rp, kappa, sigma, sAs, sAp, pAp, alpha)) < now
        if not take_cg:
            ops.cg_step_(s, r, p, Bp, a, t_star, 0.0, fused=fused)
            mq, sAs = cubic_model_along(mq, rp, kappa, sigma, sAs, sAp, pAp, t_star)
            reason = "regularised" if kappa > 0 else "negative_curvature"
            break
        rz_next = max(rz + 2 * alpha * u + alpha * alpha * w, 0.0)
        pending = ops.cg_step_(s, r, p, Bp, a, alpha, rz_next / rz, fused=fused)
        mq, sAs = cubic_model_along(mq, rp, kappa, sigma, sAs, sAp, pAp, alpha)
        if rz_next <= stop_rz:
            reason = "converged"
            break
    m = cubic(mq, sAs)
    if _worse_than_cauchy(m, cauchy_m, s):
        with torch.no_grad():
            for si, gi, ai in zip(s, grads, a):
                si.copy_(gi.to(si.dtype) / ai).mul_(-cauchy_t)
        return CGResult(cauchy_m, iters, "cauchy", cauchy_t * math.sqrt(rz0), cauchy_m)
    return CGResult(m, iters, reason, math.sqrt(max(sAs, 0.0)), cauchy_m if cauchy_m is not None else 0.0)
