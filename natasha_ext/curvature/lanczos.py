"""Lanczos on the A-scaled curvature and the small problems on its tridiagonal matrix.

With A = diag(a) the change of variables s = A^{-1/2} x turns ||s||_A into ||x||_2 and B into
C = A^{-1/2} B A^{-1/2}, so the regularised models of
"Adaptive norms for deep learning with regularized Newton methods" (anonymous, under double-blind review, 2019) become Euclidean
ones in x. :func:`lanczos` builds an orthonormal Krylov basis Q of C (full re-orthogonalisation;
the bases here are small) and the tridiagonal T = Q^T C Q. On T:

* :func:`cubic_tridiag` minimises the ARC model  gn y_1 + 1/2 y^T T y + sigma/3 ||y||^3  by the
  secular equation ||y(lam)|| = lam / sigma, y(lam) = -(T + lam I)^{-1} gn e_1, on T's
  eigendecomposition (bisection in fp64, with the hard case);
* :func:`lanczos` also yields T's leftmost eigenpair: the eigenpoint of Assumption 2 (a step of
  length radius along the most negative curvature of the A-norm).

Vectors are flat (one concatenated tensor); the curvature product maps flat to flat.
"""
from __future__ import annotations

import math
from typing import Callable, List, Sequence

import numpy as np
import torch


def flatten(ts: Sequence[torch.Tensor], dtype=None) -> torch.Tensor:
    if not ts:
        return torch.zeros(0, dtype=dtype or torch.float32)
    return torch.cat([t.reshape(-1).to(dtype or t.dtype) for t in ts])


def unflatten(x: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out, i = [], 0
    for t in like:
        n = t.numel()
        out.append(x[i:i + n].view_as(t).to(t.dtype))
        i += n
    return out


class Lanczos:
    """Incremental Lanczos for a symmetric operator ``matvec`` (flat -> flat) from ``b != 0``."""

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor):
        nb = float(b.norm())
        if not nb > 0:
            raise ValueError("Lanczos start vector is zero")
        self.matvec = matvec
        self.Q = [b / nb]
        self.alphas: List[float] = []
        self.betas: List[float] = []  # betas[j] couples q_j and q_{j+1}
        self.broke_down = False
        self.nonfinite = False  # a product returned NaN/inf: T is not usable, the caller must skip

    def step(self) -> None:
        if self.broke_down:
            return
        q = self.Q[-1]
        w = self.matvec(q)
        alpha = float(torch.dot(w, q))
        if not math.isfinite(alpha):  # any NaN/inf in w = C q reaches w^T q (inf * 0 is NaN)
            # NaN/inf curvature: stop here (T stays the finite part built so far) and say so,
            # instead of letting eigh on a NaN tridiagonal raise LinAlgError
            self.nonfinite = self.broke_down = True
            return
        w = w - alpha * q
        if len(self.Q) > 1:
            w = w - self.betas[-1] * self.Q[-2]
        for qi in self.Q:  # full re-orthogonalisation (two passes keep Q orthonormal in fp32)
            w = w - torch.dot(w, qi) * qi
        for qi in self.Q:
            w = w - torch.dot(w, qi) * qi
        beta = float(w.norm())
        if not math.isfinite(beta):
            self.nonfinite = self.broke_down = True
            return
        self.alphas.append(alpha)
        self.betas.append(beta)
        scale = max(abs(a) for a in self.alphas) + max(self.betas)
        if beta <= 1e-7 * max(scale, 1e-30) or len(self.Q) >= q.numel():
            self.broke_down = True  # invariant subspace: T is exact
        else:
            self.Q.append(w / beta)

    def T(self) -> torch.Tensor:
        k = len(self.alphas)
        T = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(self.betas[:k - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Q y for a coefficient vector of length len(alphas)."""
        out = torch.zeros_like(self.Q[0])
        for yi, qi in zip(y.tolist(), self.Q):
            out.add_(qi, alpha=yi)
        return out


def cubic_tridiag(T: torch.Tensor, gn: float, sigma: float):
    """argmin_y gn*y_1 + 1/2 y^T T y + sigma/3 ||y||^3 (global minimiser, fp64). Returns
    (y, model value, lam) with lam = sigma ||y|| the secular-equation multiplier.

    The minimiser satisfies (T + lam I) y = -gn e_1, T + lam I PSD, lam = sigma ||y||
    (Cartis et al. 2011, Thm 3.1). On T = U diag(theta) U^T, ||y(lam)|| = ||c / (theta + lam)||
    with c = gn U^T e_1, and phi(lam) = ||y(lam)|| - lam/sigma decreases on (-theta_min, inf):
    the root is bracketed and found by bisection (numpy, the matrix is tiny). Hard case (c has
    no component on the leftmost eigenvector, e.g. gn = 0): lam = -theta_min and the leftmost
    eigenvector is added to reach ||y|| = lam / sigma."""
    Tn = T.detach().cpu().double().numpy()
    theta, U = np.linalg.eigh(Tn)
    c = gn * U[0, :]
    lo = max(0.0, -float(theta[0]))
    scale = max(1.0, float(np.abs(theta).max()))

    def ynorm(lam):
        d = theta + lam
        keep = np.abs(d) > 0
        return float(np.linalg.norm(c[keep] / d[keep]))

    left = np.abs(theta - theta[0]) <= 1e-12 * scale
    hard = float(np.linalg.norm(c[left])) <= 1e-12 * max(abs(gn), 1e-300)
    if hard and (lo == 0.0 or ynorm(lo) <= lo / sigma):
        d = theta[~left] + lo
        y = -(U[:, ~left] @ (c[~left] / d)) if (~left).any() else np.zeros_like(c)
        extra = max((lo / sigma) ** 2 - float(y @ y), 0.0)
        y = y + np.sqrt(extra) * U[:, 0]
        lam = lo
    else:
        a_, b_ = lo, lo + 1.0
        while ynorm(b_) - b_ / sigma > 0:
            b_ = 2 * b_ + 1.0
        for _ in range(200):
            mid = 0.5 * (a_ + b_)
            if mid <= a_ or mid >= b_:
                break
            if ynorm(mid) - mid / sigma > 0:
                a_ = mid
            else:
                b_ = mid
        lam = b_
        y = -(U @ (c / (theta + lam)))
    val = gn * float(y[0]) + 0.5 * float(y @ (Tn @ y)) + sigma / 3 * float(np.linalg.norm(y)) ** 3
    return torch.from_numpy(y), val, lam


def leftmost(T: torch.Tensor):
    """(theta_min, unit eigenvector) of a small symmetric T (fp64)."""
    theta, U = torch.linalg.eigh(T)
    return float(theta[0]), U[:, 0]
