"""Natasha2's kicks, observed from the training loop: the loss just before and just after each one.

Natasha2 (Allen-Zhu, "Natasha 2: Faster non-convex optimization than SGD", NeurIPS 2018, Alg. 1
lines 12-17; report Alg. 3 line 11) moves y_{k+1} = y_k +- (delta/L2) v along a direction of
negative curvature v found by Oja's algorithm when v^T H v <= -delta/2. The optimizer counts
kicks (``counters['kicks']``) but does not report what a kick did to the loss, so
:class:`KickProbe` (a ``train_one`` observer) keeps a copy of the parameters before every step
and, when the step's kick counter went up, evaluates (no gradients, eval mode):

* the kick's minibatch loss before (the loss ``step`` returns, at y_k) and after (at y_{k+1});
* the loss on a fixed probe set (the first ``probe_size`` training images) before and after;
* v^T H v of every Oja run (``rayleighs``), kicked or not, to show how close the test came.

Only optimizers that keep a ``kicks`` counter are watched; for the others the probe does nothing.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

__all__ = ["KickProbe", "KICK_COLUMNS"]

#: columns of one recorded kick
KICK_COLUMNS = ["epoch", "step", "rayleigh", "batch_loss_before", "batch_loss_after", "probe_loss_before",
                "probe_loss_after"]


def _kicks(optimizer) -> Optional[float]:
    c = getattr(optimizer, "counters", None)
    return float(c["kicks"]) if isinstance(c, dict) and "kicks" in c else None


class KickProbe:
    """Records every kick of the optimizer it watches in ``self.kicks`` (dicts of :data:`KICK_COLUMNS`).

    ``probe_size``: training images (file order) whose mean loss is measured around a kick."""

    def __init__(self, probe_size: int = 500):
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be a positive integer, got {probe_size!r}")
        self.probe_size = probe_size
        self.kicks: List[Dict[str, Any]] = []
        self.rayleighs: List[float] = []          # v^T H v of every Oja run (the kick test's statistic)
        self.counters: Dict[str, float] = {}      # the optimizer's counters after the last step
        self._before: Optional[List[torch.Tensor]] = None
        self._count: Optional[float] = None
        self._oja_runs = 0.0
        self._steps = 0

    def before_step(self, optimizer) -> None:
        self._count = _kicks(optimizer)
        if self._count is None:
            return
        self._oja_runs = float(optimizer.counters.get("oja_runs", 0))
        self._before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    def after_step(self, optimizer, ctx, xb: torch.Tensor, yb: torch.Tensor, loss) -> None:
        self._steps += 1
        if self._count is None:
            return
        self.counters = {k: float(v) for k, v in optimizer.counters.items()}
        if self.counters.get("oja_runs", 0) > self._oja_runs:
            self.rayleighs.append(self.counters.get("last_rayleigh", math.nan))
        if self.counters["kicks"] == self._count:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        xp, yp = ctx.train[0][:self.probe_size], ctx.train[1][:self.probe_size]
        after_batch, after_probe = self._losses(ctx, params, None, (xb, yb), (xp, yp))
        _, before_probe = self._losses(ctx, params, self._before, None, (xp, yp))
        before_batch = float(loss) if isinstance(loss, torch.Tensor) else math.nan
        self.kicks.append(dict(epoch=ctx.epoch, step=self._steps,
                               rayleigh=self.counters.get("last_rayleigh", math.nan),
                               batch_loss_before=before_batch, batch_loss_after=after_batch,
                               probe_loss_before=before_probe, probe_loss_after=after_probe))

    @staticmethod
    @torch.no_grad()
    def _losses(ctx, params, values, batch, probe):
        """Losses on ``batch`` and ``probe`` with the parameters set to ``values`` (None: as they
        are); the parameters are restored afterwards."""
        model = ctx.model
        saved = [p.detach().clone() for p in params] if values is not None else None
        was_training = model.training
        model.eval()
        try:
            if values is not None:
                for p, v in zip(params, values):
                    p.copy_(v)
            out = [math.nan if b is None else float(ctx.loss_fn(model(b[0]), b[0], b[1])) for b in (batch, probe)]
        finally:
            if saved is not None:
                for p, v in zip(params, saved):
                    p.copy_(v)
            model.train(was_training)
        return out
