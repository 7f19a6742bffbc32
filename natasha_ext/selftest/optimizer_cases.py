"""One short run of each optimizer family, fused against reference, on a tiny conv net.

Both runs start from the same weights and seed and see the same batches; the parameters after
``STEPS`` steps must agree within the ``optimizer`` tolerance. The hyperparameters make each
short run reach the family's interesting parts: a Natasha sub-epoch end, an AdaHessian probe
(by either exact engine),
the Hybrid switch, K-FAC inverse refreshes, trust-region CG iterations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.selftest.compare import Runner

STEPS = 3
BATCH = 8


@dataclass(frozen=True)
class OptimizerCase:
    name: str                          # class of natasha_ext.optim
    kwargs: Dict[str, Any] = field(default_factory=dict)
    takes_model: bool = False          # the K-FAC family registers hooks on the model
    before_step: Callable[[Any, int], None] = lambda opt, i: None
    variant: str = ""                  # shown after the class name (a second case of one class)

    @property
    def title(self) -> str:
        return f"{self.name} {self.variant}" if self.variant else self.name


def _switch_before_last(opt, i):
    """Hybrid: a validation loss under the threshold before the last step (SGD, then AdaHessian)."""
    if i == STEPS - 1:
        opt.report_validation_loss(0.5)


OPTIMIZER_CASES: List[OptimizerCase] = [
    # snapshot_batches=1: the 3 steps reach a sub-epoch end (the default mu takes B = 4 calls)
    OptimizerCase("Natasha15", dict(lr=0.05, sigma=0.5, epoch_size=4, subepochs=2, snapshot_batches=1, seed=11)),
    OptimizerCase("Natasha2", dict(lr=0.05, sigma=0.5, epoch_size=4, subepochs=2, delta=0.2, eta=0.1,
                                   oja_iters=3, snapshot_batches=1, seed=13)),
    OptimizerCase("AdaHessian", dict(lr=0.05, seed=21)),
    # the probe as the closure's forward-mode tangent: forward AD through the model on this device
    OptimizerCase("AdaHessian", dict(lr=0.05, hvp="forward_over_reverse", seed=22), variant="hvp=forward_over_reverse"),
    OptimizerCase("HybridSGDAdaHessian", dict(switch_threshold=1.0, sgd_lr=0.05, momentum=0.9, lr=0.05, seed=23),
                  before_step=_switch_before_last),
    OptimizerCase("KFAC", dict(lr=0.05, damping=0.1, cov_every=1, inv_every=2, seed=31), takes_model=True),
    OptimizerCase("EKFAC", dict(lr=0.05, damping=0.1, inv_every=2, seed=36), takes_model=True),
    OptimizerCase("ANG", dict(lr=0.05, damping=0.1, stat_decay=0.95, cov_every=1, inv_every=2, momentum=0.9,
                              kl_clip=1e-3, total_steps=6, seed=33),
                  takes_model=True),
    OptimizerCase("IFANG", dict(lr=0.05, damping=0.1, rank=2, momentum=0.9, kl_clip=1e-3, total_steps=6, seed=34),
                  takes_model=True),
    OptimizerCase("TrustRegion", dict(radius=0.05, cg_max_iters=5, seed=41)),
    OptimizerCase("ARC", dict(sigma=3.0, eps=0.1, subproblem_max_iters=5, seed=51)),
]

OPTIMIZER_DTYPES = (torch.float32, torch.float64)


def _model(device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.Tanh(),
                         nn.Linear(5, 3)).to(device, dtype)


def optimizer_runner(case: OptimizerCase, device: str, dtype: torch.dtype) -> Runner:
    """run(fused) -> the parameters after STEPS steps of ``case`` on fixed batches."""
    import natasha_ext.optim as optim

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(BATCH, 2, 6, 6, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (BATCH,), generator=g).to(device) for _ in range(STEPS)]

    def run(fused: bool):
        model = _model(device, dtype)
        klass = getattr(optim, case.name)
        opt = klass(model if case.takes_model else model.parameters(), fused=fused, **case.kwargs)
        for i, (x, y) in enumerate(zip(xs, ys)):
            case.before_step(opt, i)
            opt.step(lambda: F.cross_entropy(model(x), y))
        return [p.detach().clone() for p in model.parameters()]
    return run
