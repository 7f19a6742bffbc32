"""The blend schedules lam(step) of the asymptotic natural gradient (ANG, IFANG).

Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a regularized natural gradient
optimization algorithm with look-ahead strategy" (2021), Sec. 2.2 and 3.1, Fig. 2: lam goes from
0 (natural gradient) toward 1 (Euclidean direction) "by a linear or exponential strategy"; the
paper plots three curves without formulas, the ones below are ours.

The default needs no horizon: with ``lam_schedule=None`` the schedule is 'linear' over
``total_steps`` when that is given, else 'saturating', lam = 1 - exp(-step / time_constant). The
paper's preferred curve (Fig. 2, "strategy 1", the most concave, best in its Fig. 1) rises fast
and flattens toward 1, which is the saturating shape; without a horizon its only scale is the
time constant, default 10000 steps: lam = 0.63 after 10k steps and 0.98 after 40k, about the
paper's CIFAR runs (~100 epochs of 391 batches). Pass total_steps for a schedule that ends at 1.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

from natasha_ext.optim import _validation as V

__all__ = ["LAMBDA_SCHEDULES", "lambda_schedule"]

LAMBDA_SCHEDULES = ("linear", "exp", "cosine", "saturating")

#: the 'saturating' schedule's default time constant, in steps (see the module docstring)
DEFAULT_TIME_CONSTANT = 10000


def lambda_schedule(kind: Union[str, Callable[[int], float], None], total_steps: Optional[int], rate: float = 5.0,
                    time_constant: int = DEFAULT_TIME_CONSTANT):
    """lam(step) in [0, 1], from 0 at step 0 toward 1 at ``total_steps`` (then held at 1):

      'linear':  lam = s,                                   s = step / total_steps
      'exp':     lam = (1 - exp(-rate s)) / (1 - exp(-rate))  (concave: the Euclidean share grows fast)
      'cosine':  lam = (1 - cos(pi s)) / 2                    (slow start and finish)
      'saturating': lam = 1 - exp(-step / time_constant)     (no horizon; total_steps unused)

    None: 'linear' when ``total_steps`` is given, else 'saturating'.
    A callable gets the step index and must return a float in [0, 1]."""
    if callable(kind):
        return kind
    if kind is None:
        kind = "linear" if total_steps is not None else "saturating"
    V.choice("lam_schedule", kind, LAMBDA_SCHEDULES)
    if kind == "saturating":
        V.positive("lam_time_constant", time_constant)
        tau = float(time_constant)
        return lambda t: 1.0 - math.exp(-t / tau)
    if total_steps is None:
        raise ValueError(f"total_steps is required with lam_schedule={kind!r} (or use lam_schedule='saturating', "
                         "which needs no horizon)")
    V.positive_int("total_steps", total_steps)
    T = float(total_steps)
    if kind == "linear":
        return lambda t: min(1.0, t / T)
    if kind == "exp":
        den = 1.0 - math.exp(-rate)
        return lambda t: min(1.0, (1.0 - math.exp(-rate * min(t, T) / T)) / den)
    return lambda t: 0.5 * (1.0 - math.cos(math.pi * min(t, T) / T))
