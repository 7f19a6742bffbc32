"""Which Fisher K-FAC's output-gradient statistics (G, and the elementwise Fisher of norm layers)
describe: the vectors backpropagated from the model output.

* ``'empirical'``: the gradient of the training loss at the observed targets (the hooked
  output gradients of the user's own backward pass). Cheapest; not the Fisher (Kunstner, Balles &
  Hennig, "Limitations of the empirical Fisher approximation for natural gradient descent", 2019).
* ``'mc'``: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
  curvature" (2015), Sec. 5: ``mc_samples`` targets y ~ p(y | f(x)) drawn from the model's
  predictive distribution, and the gradients of -log p(y | f) backpropagated (an unbiased
  estimate of the Fisher, which for these likelihoods equals the generalized Gauss-Newton matrix).
* ``'type2'``: the exact expectation over y (Martens & Grosse 2015, Sec. 5, "type-2"): one
  backward pass per column c of a square root S of the loss Hessian H = S S^T w.r.t. the output,
  so that sum_c g_c g_c^T = J^T H J, the generalized Gauss-Newton factor.

Likelihoods (the per-example negative log-likelihood l(f, y) whose Fisher is computed; f is the
model's output):

* ``'categorical'``: l = cross-entropy of the logits on dim 1 (what ``F.cross_entropy`` takes:
  (B, C) or (B, C, d1, ...), every position an independent categorical, summed per example);
  MC: v = softmax(f) - onehot(y); H = diag(p) - p p^T, S[:, c] = sqrt(p_c) (e_c - p).
* ``'gaussian'``: l = sum_c (f_c - y_c)^2, i.e. y ~ N(f, I/2) (``F.mse_loss(reduction='sum')`` per
  example); MC: v = 2 (f - y); H = 2 I, S = sqrt(2) I. For ``F.mse_loss`` with its default mean over
  C outputs the factors are C times the Fisher (GGN) of that loss, a constant factor.

The draws use a ``torch.Generator`` and the same calls, in the same order, as curvlinops'
``KFACLinearOperator.draw_label`` (``softmax(f, 1).multinomial(1)``; ``sqrt(1/2) * randn(f.shape)``),
so that one seed gives both libraries the same targets.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from natasha_ext.precision import accumulation_dtype

__all__ = ["FISHER_TYPES", "LIKELIHOODS", "check_fisher_args", "output_gradients"]

FISHER_TYPES = ("empirical", "mc", "type2")
LIKELIHOODS = ("categorical", "gaussian")


def check_fisher_args(fisher: str, likelihood: str, mc_samples: int) -> None:
    """Raise ValueError naming the argument for a bad fisher / likelihood / mc_samples."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"invalid fisher: {fisher!r} (must be one of {FISHER_TYPES})")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"invalid likelihood: {likelihood!r} (must be one of {LIKELIHOODS})")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if fisher != "mc" and mc_samples != 1:
        raise ValueError(f"mc_samples={mc_samples} applies to fisher='mc' only (fisher={fisher!r})")


def output_gradients(output: torch.Tensor, fisher: str, likelihood: str, mc_samples: int,
                     generator: torch.Generator) -> Tuple[List[torch.Tensor], float]:
    """(vectors, weight): the output gradients v (shaped like ``output``) to backpropagate, and the
    weight w of each, so that the Fisher's G is w * sum_v (J^T v)(J^T v)^T per example
    (w = 1/mc_samples for 'mc', 1 for 'type2')."""
    f = output.detach()
    if likelihood == "categorical":
        if f.dim() < 2 or f.shape[1] < 2:
            raise ValueError(f"likelihood='categorical' needs the model output to hold >= 2 class logits on dim 1 "
                             f"(as F.cross_entropy takes them), got shape {tuple(f.shape)}; pass "
                             "likelihood='gaussian' for a regression output, or fisher='empirical'")
        classes = f.shape[1]
        moved = f.movedim(1, -1)
        p = moved.reshape(-1, classes).to(accumulation_dtype(f)).softmax(1)
        # non-finite logits (a step the optimizer will skip): draw from a uniform row, not raise
        p = torch.nan_to_num(p, nan=1.0 / classes, posinf=1.0 / classes, neginf=0.0)
        eye = torch.eye(classes, dtype=p.dtype, device=p.device)
        if fisher == "mc":
            rows = [p - eye[p.multinomial(1, generator=generator).squeeze(-1)] for _ in range(mc_samples)]
        else:
            rows = [p[:, c:c + 1].sqrt() * (eye[c] - p) for c in range(classes)]
        vs = [r.reshape(moved.shape).movedim(-1, 1).to(f.dtype) for r in rows]
    else:
        if fisher == "mc":
            vs = []
            for _ in range(mc_samples):
                y = f + math.sqrt(0.5) * torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
                vs.append(2.0 * (f - y))
        else:
            width = f.shape[-1] if f.dim() > 1 else 1
            vs = []
            for c in range(width):
                v = torch.zeros_like(f)
                (v[..., c] if f.dim() > 1 else v).fill_(math.sqrt(2.0))
                vs.append(v)
    return vs, (1.0 / mc_samples if fisher == "mc" else 1.0)
