"""The blend schedules lam(step) of the asymptotic natural gradient (ANG, IFANG).

Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a regularized natural gradient
optimization algorithm with look-ahead strategy" (2021), Sec. 2.2 and 3.1, Fig. 2: lam goes from
0 (natural gradient) toward 1 (Euclidean direction) "by a linear or exponential strategy"; the
paper plots three curves without formulas, the ones below are ours.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

from natasha_ext.optim import _validation as V

__all__ = ["LAMBDA_SCHEDULES", "lambda_schedule"]

LAMBDA_SCHEDULES = ("linear", "exp", "cosine")


def lambda_schedule(kind: Union[str, Callable[[int], float]], total_steps: Optional[int], rate: float = 5.0):
    """lam(step) in [0, 1], from 0 at step 0 toward 1 at ``total_steps`` (then held at 1):

      'linear':  lam = s,                                   s = step / total_steps
      'exp':     lam = (1 - exp(-rate s)) / (1 - exp(-rate))  (concave: the Euclidean share grows fast)
      'cosine':  lam = (1 - cos(pi s)) / 2                    (slow start and finish)

    A callable gets the step index and must return a float in [0, 1]."""
    if callable(kind):
        return kind
    V.choice("lam_schedule", kind, LAMBDA_SCHEDULES)
    if total_steps is None:
        raise ValueError(f"total_steps is required with lam_schedule={kind!r}")
    V.positive_int("total_steps", total_steps)
    T = float(total_steps)
    if kind == "linear":
        return lambda t: min(1.0, t / T)
    if kind == "exp":
        den = 1.0 - math.exp(-rate)
        return lambda t: min(1.0, (1.0 - math.exp(-rate * min(t, T) / T)) / den)
    return lambda t: 0.5 * (1.0 - math.cos(math.pi * min(t, T) / T))
