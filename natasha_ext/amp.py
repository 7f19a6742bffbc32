"""Mixed precision with the closure convention.

``torch.amp.GradScaler`` assumes the user calls ``scaler.scale(loss).backward()`` and the
optimizer consumes ``.grad``; the optimizers of this package differentiate the closure
themselves (gradients, Hessian-vector products), so the scaling has to happen inside their
engines. :func:`scaled_step` runs one ``optimizer.step(closure)`` with the shared engines
(:mod:`natasha_ext.curvature.hvp`) differentiating ``scale * loss`` and unscaling before any
curvature is formed; an overflow (inf/NaN after unscaling) is a skipped step
(``counters['skipped_steps']``), and the scaler backs off / grows exactly like
``GradScaler.update``::

    scaler = torch.amp.GradScaler("cuda")
    for x, y in loader:
        def closure():
            with torch.autocast("cuda", dtype=torch.float16):
                return loss_fn(model(x), y)
        natasha_ext.amp.scaled_step(opt, closure, scaler)

bf16 needs no scaler (same exponent range as fp32): ``opt.step(closure)`` with the autocast
inside the closure is enough. Optimizer state stays fp32 for fp16/bf16 parameters.

K-FAC's hooks see the scaled backward pass: construct it with ``grad_scaler=scaler`` so it
divides the scale out of its G statistics (checked here).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from natasha_ext.curvature.hvp import loss_scale
from natasha_ext.optim._base import NonFiniteError


def scaled_step(optimizer, closure: Callable[[], torch.Tensor], scaler: Optional["torch.amp.GradScaler"]):
    """``optimizer.step(closure)`` under ``scaler``'s loss scale; returns the step's loss
    (None when an overflow raised ``NonFiniteError`` with ``raise_on_nonfinite=True``)."""
    if scaler is None or not scaler.is_enabled():
        return optimizer.step(closure)
    if hasattr(optimizer, "_grad_scaler") and getattr(optimizer, "_grad_scaler") is not scaler:
        raise ValueError(f"{type(optimizer).__name__} collects curvature statistics in its own hooks: construct it "
                         "with grad_scaler=<the same GradScaler> so the loss scale is divided out")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    scaler.scale(torch.zeros((), device=device))  # lazily creates the scale tensor on the right device
    scale = float(scaler.get_scale())
    skipped = optimizer.counters["skipped_steps"]
    loss, overflow = None, False
    try:
        with loss_scale(scale):
            loss = optimizer.step(closure)
    except NonFiniteError:
        overflow = True
    overflow = overflow or optimizer.counters["skipped_steps"] > skipped
    # GradScaler.update's rule: back off on overflow, grow after growth_interval clean steps
    good = 0 if overflow else getattr(scaler, "_natasha_clean_steps", 0) + 1
    new_scale = scale * scaler.get_backoff_factor() if overflow else scale
    if good >= scaler.get_growth_interval():
        new_scale, good = scale * scaler.get_growth_factor(), 0
    scaler._natasha_clean_steps = good
    scaler.update(new_scale)
    return loss
