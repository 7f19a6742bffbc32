"""Every optimizer of the zoo under PyTorch Lightning's ``Trainer`` with automatic optimization
(Lightning's closure runs training_step, zero_grad and backward and returns a detached loss): a
few steps of a 6-16-2 MLP on synthetic data, on the CPU. The loss must fall and the parameters
move, finitely; Gauss-Newton curvature and the HVP engines that differentiate the loss themselves,
which need the package's closure convention, are refused naming the argument."""
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.suites.optimizer_zoo import ZOO, case_params

pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed (tools/bootstrap.sh pins it)")

STEPS, BATCH = 10, 32  # Natasha2 spends its first two calls on Oja and the fresh-minibatch kick test


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 6, generator=g)
    w = torch.randn(6, 2, generator=g)
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(STEPS * BATCH, 2, generator=g)


class MLP(pl.LightningModule):
    def __init__(self, case, make=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        self.case, self.make = case, make or (lambda module: case.make(module))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        if self.case.before_step is not None:  # the hybrids' validation report
            self.case.before_step(self.optimizers().optimizer, batch_idx)

    def configure_optimizers(self):
        return self.make(self)  # the K-FAC family hooks this module's layers


def fit(module):
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, enable_progress_bar=False, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        trainer.fit(module, loader)
    return trainer


@pytest.fixture(autouse=True)
def quiet_lightning():
    logger = logging.getLogger("pytorch_lightning")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def full_loss(module):
    x, y = data()
    with torch.no_grad():
        return float(F.mse_loss(module(x), y))


@case_params([c for c in ZOO if not c.outputs and not c.package_closure_only])
def test_trains_under_lightning_automatic_optimization(case):
    module = MLP(case)
    start = [p.detach().clone() for p in module.parameters()]
    before = full_loss(module)
    trainer = fit(module)
    opt = trainer.optimizers[0]
    assert trainer.global_step == STEPS
    assert opt.counters["steps"] > 0 and opt.counters["skipped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(p, s) for p, s in zip(module.parameters(), start))
    assert full_loss(module) < before


@case_params([c for c in ZOO if c.package_closure_only])
def test_engines_that_differentiate_the_loss_themselves_are_refused_naming_hvp(case):
    """hvp='exact' / 'forward_over_reverse' differentiate the closure's loss, which Lightning's
    closure has already run backward on: a ValueError naming hvp, parameters untouched."""
    module = MLP(case)
    start = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=f"hvp='{case.kwargs['hvp']}'.*called backward"):
        fit(module)
    assert all(torch.equal(p, s) for p, s in zip(module.parameters(), start))


@case_params([c for c in ZOO if c.outputs])
def test_gauss_newton_under_lightning_is_refused_naming_curvature(case):
    """Gauss-Newton products need the outputs' graph, which Lightning's backward frees (the
    optimizer is given model= so that a loss-only closure would otherwise do)."""
    module = MLP(case, make=lambda m: case.klass(m.parameters(), model=m, **case.kwargs))
    start = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match="curvature='gauss_newton'.*called backward"):
        fit(module)
    assert all(torch.equal(p, s) for p, s in zip(module.parameters(), start))
