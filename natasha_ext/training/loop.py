"""The training loop: one optimizer, one seed, ``config.epochs`` epochs, one history row per epoch.

One code path serves every optimizer. Per minibatch the loop builds a closure; the optimizer's
:class:`~natasha_ext.cli_optimizers.OptimizerSpec` says which convention it follows: ``"loss"``
(this package's second-order optimizers: the closure returns the loss without backward and the
optimizer differentiates, possibly several times) or ``"backward"`` (``torch.optim``: the
closure zeroes the grads and calls backward). Given a seed, every optimizer starts from the same
initial weights and sees the same minibatch order.

Counted per epoch (cumulative): optimizer steps, backprops (gradient evaluations: the
optimizer's ``counters['gradients']`` when it keeps counters, else the closure's backward calls)
and Hessian-vector products (``counters['hvps']``); wall time counts training only, not evaluation.

With a :class:`~natasha_ext.training.checkpoint.RunCheckpoint` the loop saves, after every
epoch, everything the rest of the run depends on (model, optimizer, minibatch generator, torch
RNG, counters, rows), and a resumed run continues bit-identically.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from natasha_ext import cli_optimizers, data
from natasha_ext.training.checkpoint import RunCheckpoint
from natasha_ext.training.config import TrainConfig

__all__ = ["make_optimizer", "hyperparameters", "evaluate", "EpochContext", "train_one", "loss_function"]


#: ``hyperparameters(config, name)``: what optimizer ``name`` runs with under ``config``
hyperparameters = TrainConfig.hyperparameters


def make_optimizer(name: str, model: torch.nn.Module, params=None, *, seed: int = 0,
                   config: Optional[TrainConfig] = None, **hparams):
    """Build registered optimizer ``name`` for ``model`` as the CLI would (its defaults, then
    ``config.hparams``, then ``hparams``); returns ``(optimizer, spec)``. ``spec.closure`` says
    whether ``step``'s closure must call backward (``"backward"``) or not (``"loss"``).

    >>> opt, spec = make_optimizer("adam", model, lr=3e-4)
    """
    spec = cli_optimizers.get_spec(name)
    unknown = set(hparams) - set(spec.flags)
    if unknown:
        raise TypeError(f"{name} has no hyperparameter(s) {sorted(unknown)}; it takes {sorted(spec.flags)}")
    config = config if config is not None else TrainConfig(optimizers=[name], model="mlp")
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    return spec.build(model, params, config.build_namespace(seed, name, **hparams)), spec


def loss_function(task: str, recon_loss: str = "mse") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                                  torch.Tensor]:
    """``loss(output, x, y)``: cross-entropy, or the autoencoder's reconstruction loss."""
    if task == "reconstruction":
        if recon_loss == "bce":
            return lambda out, x, y: F.binary_cross_entropy_with_logits(out, x.flatten(1))
        return lambda out, x, y: F.mse_loss(torch.sigmoid(out), x.flatten(1))
    return lambda out, x, y: F.cross_entropy(out, y)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             task: str = "classification") -> Tuple[float, float]:
    """Mean loss and accuracy (NaN for reconstruction / empty sets) in eval mode."""
    if x.shape[0] == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.float64, device=x.device)
    for xb, yb in data.batches(x, y, batch_size):
        out = model(xb)
        total += loss_fn(out, xb, yb).double() * xb.shape[0]
        if task == "classification":
            correct += (out.argmax(1) == yb).sum()
    model.train(was_training)
    n = x.shape[0]
    return float(total) / n, (float(correct) / n if task == "classification" else math.nan)


@dataclass
class EpochContext:
    """What the optimizer hooks (``epoch_start``/``epoch_end``) can see."""
    model: torch.nn.Module
    loss_fn: Callable
    train: Tuple[torch.Tensor, torch.Tensor]
    batch_size: int
    epoch: int
    epochs: int
    seed: int
    metrics: Dict[str, float] = field(default_factory=dict)

    def full_batches(self, batch_size: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The whole training set in file order (e.g. for an SVRG snapshot gradient)."""
        return data.batches(*self.train, batch_size or self.batch_size)

    def closure_for(self, xb: torch.Tensor, yb: torch.Tensor) -> Callable[[], torch.Tensor]:
        """A loss-only closure (no backward) on one batch."""
        return lambda: self.loss_fn(self.model(xb), xb, yb)


def _counters(optimizer, closure_backprops: int) -> Tuple[float, float, float]:
    c = getattr(optimizer, "counters", None)
    if isinstance(c, dict):
        return float(c.get("gradients", closure_backprops)), float(c.get("hvps", 0)), float(c.get("skipped_steps", 0))
    return float(closure_backprops), 0.0, 0.0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rng_state(device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def train_one(config: TrainConfig, name: str, model: torch.nn.Module, splits: data.Splits, seed: int,
              task: str = "classification", log: Optional[Callable[[str], None]] = None,
              stop: Optional[Callable[[Dict[str, Any]], bool]] = None,
              checkpoint: Optional[RunCheckpoint] = None,
              on_row: Optional[Callable[[Dict[str, Any], bool], None]] = None,
              observer: Optional[Any] = None) -> List[Dict[str, Any]]:
    """Train ``model`` (already on ``config.device`` and initialised) with optimizer ``name``
    (hyperparameters from ``config``) for ``config.epochs`` epochs; returns one history row per
    epoch (epoch 0 = before training).

    ``stop(row)``, called after each epoch's row, ends the run early when it returns True (e.g.
    a target training accuracy reached). ``checkpoint``: save the run after every epoch and, when
    it holds a saved epoch, continue from there. ``on_row(row, new)`` sees every row as it is
    made (``new`` False for rows restored from the checkpoint). ``observer``: an object with
    ``before_step(optimizer)`` and ``after_step(optimizer, ctx, xb, yb, loss)`` called around
    every optimizer step (e.g. :class:`~natasha_ext.training.kicks.KickProbe`); its own work is
    timed with the epoch."""
    from tqdm.auto import tqdm

    saved = checkpoint.load() if checkpoint is not None else None
    emit = on_row or (lambda row, new: None)
    if saved is not None and saved["finished"]:
        for row in saved["rows"]:
            emit(row, False)
        return saved["rows"]
    loss_fn = loss_function(task, config.recon_loss)
    torch.manual_seed(seed)
    optimizer, spec = make_optimizer(name, model, seed=seed, config=config)
    gen = torch.Generator().manual_seed(seed)          # same minibatch order for every optimizer
    (xtr, ytr), (xva, yva), (xte, yte) = splits.train, splits.val, splits.test
    ev = lambda x, y: evaluate(model, loss_fn, x, y, config.eval_batch_size, task)
    count = {"steps": 0, "closure_calls": 0, "closure_backprops": 0, "wall": 0.0}
    rows: List[Dict[str, Any]] = []

    def record(epoch: int, minibatch_loss: float, epoch_time: float) -> Dict[str, Any]:
        (trl, tra), (val, vaa), (tel, tea) = ev(xtr, ytr), ev(xva, yva), ev(xte, yte)
        backprops, hvps, skipped = _counters(optimizer, count["closure_backprops"])
        row = dict(optimizer=name, seed=seed, epoch=epoch, train_loss=trl, train_acc=tra, val_loss=val, val_acc=vaa,
                   test_loss=tel, test_acc=tea, minibatch_loss=minibatch_loss, wall_time=count["wall"],
                   epoch_time=epoch_time, steps=count["steps"], backprops=backprops, hvps=hvps,
                   closure_calls=count["closure_calls"], skipped_steps=skipped,
                   lr=float(optimizer.param_groups[0].get("lr", math.nan)))
        rows.append(row)
        return row

    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        gen.set_state(saved["batch_generator"])
        _set_rng_state(saved["rng"])
        count.update(saved["counters"])
        rows.extend(saved["rows"])
        for row in rows:
            emit(row, False)
    else:
        emit(record(0, math.nan, 0.0), True)
    model.train()
    n_batches = data.num_batches(xtr.shape[0], config.batch_size, config.bootstrap)
    for epoch in range(rows[-1]["epoch"] + 1, config.epochs + 1):
        ctx = EpochContext(model, loss_fn, (xtr, ytr), config.batch_size, epoch, config.epochs, seed)
        _sync(config.device)
        t0 = time.perf_counter()
        if spec.epoch_start is not None:
            spec.epoch_start(optimizer, ctx)
        loss_sum = torch.zeros((), dtype=torch.float64, device=xtr.device)
        n_loss = 0
        it = data.batches(xtr, ytr, config.batch_size, shuffle=True, generator=gen, bootstrap=config.bootstrap)
        bar = tqdm(it, total=n_batches, desc=f"{name} seed {seed} epoch {epoch}/{config.epochs}", leave=False,
                   disable=not config.progress, dynamic_ncols=True, position=1)
        for xb, yb in bar:
            if spec.closure == "loss":
                def closure(xb=xb, yb=yb):
                    count["closure_calls"] += 1
                    return loss_fn(model(xb), xb, yb)
            else:
                def closure(xb=xb, yb=yb):
                    count["closure_calls"] += 1
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), xb, yb)
                    loss.backward()
                    count["closure_backprops"] += 1
                    return loss
            optimizer.zero_grad(set_to_none=True)
            if observer is not None:
                observer.before_step(optimizer)
            loss = optimizer.step(closure)
            if observer is not None:
                observer.after_step(optimizer, ctx, xb, yb, loss)
            count["steps"] += 1
            if isinstance(loss, torch.Tensor):
                loss_sum += loss.detach().double().reshape(())
                n_loss += 1
            if config.progress and count["steps"] % 10 == 0 and n_loss:
                bar.set_postfix(loss=f"{float(loss_sum) / n_loss:.4f}")
        bar.close()
        _sync(config.device)
        epoch_time = time.perf_counter() - t0
        count["wall"] += epoch_time
        mb = float(loss_sum) / n_loss if n_loss else math.nan
        row = record(epoch, mb, epoch_time)
        if spec.epoch_end is not None:
            ctx.metrics = dict(row)
            spec.epoch_end(optimizer, ctx)
        diverged = not math.isfinite(row["train_loss"]) or (n_loss > 0 and not math.isfinite(mb))
        if diverged:
            row["diverged"] = True
        finished = diverged or epoch == config.epochs or (stop is not None and stop(row))
        if checkpoint is not None:
            checkpoint.save(rows, finished, None if finished else dict(
                model=model.state_dict(), optimizer=optimizer.state_dict(), batch_generator=gen.get_state(),
                rng=_rng_state(config.device), counters=dict(count)))
        emit(row, True)
        if log is not None:
            acc = "" if task != "classification" else f" val_acc {row['val_acc']:.4f} test_acc {row['test_acc']:.4f}"
            log(f"[{name} seed {seed}] epoch {epoch}/{config.epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f}{acc} time {count['wall']:.1f}s backprops {row['backprops']:.0f} "
                f"hvps {row['hvps']:.0f}")
            if diverged:
                log(f"[{name} seed {seed}] loss is not finite: stopping this run (diverged)")
        if finished:
            break
    return rows
