"""Training program: real MNIST / Fashion-MNIST, any registered optimizer, progress bars,
per-epoch metrics, CSV + JSON + PNG, and a mean ± std summary over seeds.

    python -m natasha_ext.train --optimizer sgd sgd-momentum adam --model lenet5 --epochs 5
    python python/train.py --optimizer adam --model resnet18 --subset 1200/200/200 --seeds 0-9

Defaults reproduce the AdaHessian/Hybrid paper's setting: MNIST, 1200/200/200 class-balanced
split, ResNet-18 (1-channel stem), batch 100, 15 epochs, cross-entropy, no regularisation;
each optimizer's hyperparameter defaults come from its paper (``--help`` lists them).

One code path serves every optimizer. Per minibatch the trainer builds a closure; its
:class:`~natasha_ext.cli_optimizers.OptimizerSpec` says which convention the optimizer follows:
``"loss"`` (this package's second-order optimizers: the closure returns the loss without
backward and the optimizer differentiates, possibly several times) or ``"backward"``
(``torch.optim``: the closure zeroes the grads and calls backward). Given a seed, every
optimizer starts from the same initial weights and sees the same minibatch order.

Counted per epoch (cumulative): optimizer steps, backprops (gradient evaluations: the
optimizer's ``counters['gradients']`` when it keeps counters, else the closure's backward calls)
and Hessian-vector products (``counters['hvps']``); wall time counts training only, not evaluation.

The function API (:func:`parse_args`, :func:`run`, :func:`train_one`) is what the paper
reproduction programs build on.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from natasha_ext import cli_optimizers, data, models

__all__ = ["build_parser", "parse_args", "run", "train_one", "make_optimizer", "hyperparameters", "evaluate", "summarize", "format_table",
           "EpochContext", "HISTORY_COLUMNS", "main"]

#: columns of history.csv, one row per (optimizer, seed, epoch); epoch 0 is the initial model
HISTORY_COLUMNS = ["optimizer", "seed", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                   "test_acc", "minibatch_loss", "wall_time", "epoch_time", "steps", "backprops", "hvps",
                   "closure_calls", "skipped_steps", "lr"]

_GENERAL = {"optimizer", "model", "model_arg", "dataset", "subset", "data_seed", "image_size", "channels",
            "normalize", "epochs", "batch_size", "eval_batch_size", "bootstrap", "seeds", "device", "threads",
            "out", "run_name", "progress", "plot", "recon_loss", "verbose", "seed"}


# ---------------------------------------------------------------------------------------- CLI
def _parse_seeds(text: str) -> List[int]:
    """'0' -> [0]; '0,1,2' -> [0, 1, 2]; '0-9' -> [0..9]; parts combine: '0-2,7'."""
    seeds: List[int] = []
    try:
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            if sep:
                if int(hi) < int(lo):
                    raise argparse.ArgumentTypeError(f"seed range {part!r} is empty")
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like 0 or 0,1,2 or 0-9 (non-negative), got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def _parse_model_arg(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-arg wants KEY=VALUE (VALUE as JSON), got {text!r}")
    k, v = text.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, list):
        val = tuple(val)
    return k.strip().replace("-", "_"), val


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the optimizer flags' None (their help lists per-optimizer defaults)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    names = list(cli_optimizers.OPTIMIZERS)
    p = argparse.ArgumentParser(
        prog="python -m natasha_ext.train",
        description="Train a zoo model on offline MNIST / Fashion-MNIST with one or more optimizers.",
        formatter_class=_Formatter)
    p.add_argument("--optimizer", "--optimizers", nargs="+", default=["sgd"], metavar="NAME",
                   help=f"one or more of: {', '.join(names)} (comma-separated also works; 'all' = every one)")
    p.add_argument("--model", default="resnet18", help=f"one of {sorted(models.MODELS)}")
    p.add_argument("--model-arg", action="append", type=_parse_model_arg, default=[], metavar="KEY=VALUE",
                   help="extra model constructor argument, VALUE as JSON (e.g. hidden=[64], stem=\"small\")")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default="mnist")
    p.add_argument("--subset", default="1200/200/200",
                   help="TRAIN/VAL/TEST sizes, class-balanced ('all' allowed; presets: adahessian, full)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the subset draw (same split for every seed)")
    p.add_argument("--image-size", type=int, default=28, help="28, or 32 (zero-padded)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise pixels with the training-set mean/std (classification models)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--bootstrap", type=float, default=None, metavar="FRACTION",
                   help="each epoch, resample FRACTION x N training examples with replacement "
                        "(the Natasha report uses 0.1) instead of one pass over a permutation")
    p.add_argument("--seeds", type=_parse_seeds, default=[0],
                   help="seeds of the initial weights and minibatch order: '0', '0,1,2' or '0-9'")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--recon-loss", choices=("mse", "bce"), default="mse",
                   help="reconstruction loss of the autoencoder (on sigmoid outputs / logits)")
    p.add_argument("--out", default=None, help="results folder (default results/train/<run-name>)")
    p.add_argument("--run-name", default=None)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write curves.png")
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True,
                   help="print one line per epoch and the summary table")

    hp = p.add_argument_group("optimizer hyperparameters (the default depends on the optimizer)")
    for flag_name, per_opt in cli_optimizers.flag_table().items():
        if flag_name in _GENERAL:
            raise ValueError(f"optimizer flag {flag_name!r} collides with a general training flag; rename it")
        defaults = ", ".join(f"{o}={f.default}" for o, f in per_opt.items())
        helps = sorted({f.help for f in per_opt.values() if f.help})
        choices = next((f.choices for f in per_opt.values() if f.choices), None)
        kind = cli_optimizers.flag_type(flag_name)
        opt = "--" + flag_name.replace("_", "-")
        text = f"{'; '.join(helps)} [default: {defaults}]" if helps else f"[default: {defaults}]"
        text = text.replace("%", "%%")
        if kind is bool:
            hp.add_argument(opt, dest=flag_name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            hp.add_argument(opt, dest=flag_name, type=kind, choices=choices, default=None, metavar="X", help=text)
    return p


def _optimizer_names(raw: Sequence[str]) -> List[str]:
    names: List[str] = []
    for item in raw:
        for n in str(item).split(","):
            n = n.strip()
            if not n:
                continue
            if n == "all":
                names.extend(x for x in cli_optimizers.OPTIMIZERS if x not in names)
                continue
            cli_optimizers.get_spec(n)                   # raises with the list of choices
            if n not in names:
                names.append(n)
    if not names:
        raise ValueError("no optimizer given")
    return names


def parse_args(argv: Optional[Sequence[str]] = None, **overrides) -> argparse.Namespace:
    """Parse CLI arguments (``argv=None`` reads sys.argv); ``overrides`` set fields afterwards,
    e.g. ``parse_args([], optimizer=['adam'], epochs=3)``."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise TypeError(f"unknown training option {k!r}")
        setattr(args, k, v)
    try:
        args.optimizer = _optimizer_names(args.optimizer if not isinstance(args.optimizer, str) else [args.optimizer])
    except ValueError as e:
        parser.error(str(e))
    if isinstance(args.seeds, (int, str)):
        args.seeds = _parse_seeds(str(args.seeds))
    return args


def hyperparameters(args: argparse.Namespace, name: str) -> Dict[str, Any]:
    """The hyperparameters optimizer ``name`` runs with: flags given on the command line, else
    the optimizer's own defaults."""
    spec = cli_optimizers.get_spec(name)
    out = {}
    for flag_name in spec.flags:
        given = getattr(args, flag_name, None)
        out[flag_name] = spec.flag(flag_name).default if given is None else given
    return out


def make_optimizer(name: str, model: torch.nn.Module, params=None, *, seed: int = 0,
                   args: Optional[argparse.Namespace] = None, **hparams):
    """Build registered optimizer ``name`` for ``model`` as the CLI would (its defaults, then
    ``args``' flags, then ``hparams``); returns ``(optimizer, spec)``. ``spec.closure`` says
    whether ``step``'s closure must call backward (``"backward"``) or not (``"loss"``).

    >>> opt, spec = make_optimizer("adam", model, lr=3e-4)
    """
    spec = cli_optimizers.get_spec(name)
    args = args if args is not None else parse_args([], optimizer=[name])
    unknown = set(hparams) - set(spec.flags)
    if unknown:
        raise TypeError(f"{name} has no hyperparameter(s) {sorted(unknown)}; it takes {sorted(spec.flags)}")
    hp = argparse.Namespace(**{**vars(args), **hyperparameters(args, name), **hparams, "seed": seed})
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    return spec.build(model, params, hp), spec


# ---------------------------------------------------------------------------------- training
def _loss_fn(task: str, recon_loss: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
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


def train_one(args: argparse.Namespace, name: str, model: torch.nn.Module, splits: data.Splits, seed: int,
              task: str = "classification", log: Optional[Callable[[str], None]] = None,
              stop: Optional[Callable[[Dict[str, Any]], bool]] = None) -> List[Dict[str, Any]]:
    """Train ``model`` (already on ``args.device`` and initialised) with optimizer ``name`` for
    ``args.epochs`` epochs; returns one history row per epoch (epoch 0 = before training).
    ``stop(row)``, called after each epoch's row, ends the run early when it returns True (e.g. a
    target training accuracy reached)."""
    from tqdm.auto import tqdm

    loss_fn = _loss_fn(task, args.recon_loss)
    torch.manual_seed(seed)
    optimizer, spec = make_optimizer(name, model, seed=seed, args=args)
    gen = torch.Generator().manual_seed(seed)          # same minibatch order for every optimizer
    (xtr, ytr), (xva, yva), (xte, yte) = splits.train, splits.val, splits.test
    ev = lambda x, y: evaluate(model, loss_fn, x, y, args.eval_batch_size, task)

    steps = closure_calls = closure_backprops = 0
    wall = 0.0
    rows: List[Dict[str, Any]] = []

    def record(epoch: int, minibatch_loss: float, epoch_time: float) -> Dict[str, Any]:
        (trl, tra), (val, vaa), (tel, tea) = ev(xtr, ytr), ev(xva, yva), ev(xte, yte)
        backprops, hvps, skipped = _counters(optimizer, closure_backprops)
        row = dict(optimizer=name, seed=seed, epoch=epoch, train_loss=trl, train_acc=tra, val_loss=val, val_acc=vaa,
                   test_loss=tel, test_acc=tea, minibatch_loss=minibatch_loss, wall_time=wall, epoch_time=epoch_time,
                   steps=steps, backprops=backprops, hvps=hvps, closure_calls=closure_calls, skipped_steps=skipped,
                   lr=float(optimizer.param_groups[0].get("lr", math.nan)))
        rows.append(row)
        return row

    record(0, math.nan, 0.0)
    model.train()
    for epoch in range(1, args.epochs + 1):
        ctx = EpochContext(model, loss_fn, (xtr, ytr), args.batch_size, epoch, args.epochs, seed)
        _sync(args.device)
        t0 = time.perf_counter()
        if spec.epoch_start is not None:
            spec.epoch_start(optimizer, ctx)
        loss_sum = torch.zeros((), dtype=torch.float64, device=xtr.device)
        n_loss = 0
        it = data.batches(xtr, ytr, args.batch_size, shuffle=True, generator=gen, bootstrap=args.bootstrap)
        n_batches = math.ceil((round(args.bootstrap * xtr.shape[0]) if args.bootstrap else xtr.shape[0])
                              / args.batch_size)
        bar = tqdm(it, total=n_batches, desc=f"{name} seed {seed} epoch {epoch}/{args.epochs}", leave=False,
                   disable=not args.progress, dynamic_ncols=True)
        for xb, yb in bar:
            if spec.closure == "loss":
                def closure(xb=xb, yb=yb):
                    nonlocal closure_calls
                    closure_calls += 1
                    return loss_fn(model(xb), xb, yb)
            else:
                def closure(xb=xb, yb=yb):
                    nonlocal closure_calls, closure_backprops
                    closure_calls += 1
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model(xb), xb, yb)
                    loss.backward()
                    closure_backprops += 1
                    return loss
            optimizer.zero_grad(set_to_none=True)
            loss = optimizer.step(closure)
            steps += 1
            if isinstance(loss, torch.Tensor):
                loss_sum += loss.detach().double().reshape(())
                n_loss += 1
            if args.progress and steps % 10 == 0 and n_loss:
                bar.set_postfix(loss=f"{float(loss_sum) / n_loss:.4f}")
        bar.close()
        _sync(args.device)
        epoch_time = time.perf_counter() - t0
        wall += epoch_time
        mb = float(loss_sum) / n_loss if n_loss else math.nan
        row = record(epoch, mb, epoch_time)
        if spec.epoch_end is not None:
            ctx.metrics = dict(row)
            spec.epoch_end(optimizer, ctx)
        if log is not None:
            acc = "" if task != "classification" else f" val_acc {row['val_acc']:.4f} test_acc {row['test_acc']:.4f}"
            log(f"[{name} seed {seed}] epoch {epoch}/{args.epochs}: train_loss {row['train_loss']:.4f} "
                f"val_loss {row['val_loss']:.4f}{acc} time {wall:.1f}s backprops {row['backprops']:.0f} "
                f"hvps {row['hvps']:.0f}")
        if not math.isfinite(row["train_loss"]) or (n_loss and not math.isfinite(mb)):
            if log is not None:
                log(f"[{name} seed {seed}] loss is not finite: stopping this run (diverged)")
            row["diverged"] = True
            break
        if stop is not None and stop(row):
            break
    return rows


# ----------------------------------------------------------------------------------- summary
def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


SUMMARY_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "wall_time",
                   "backprops", "hvps", "steps"]


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per optimizer: mean and std over seeds of each run's final-epoch metrics."""
    last: Dict[Tuple[str, int], Dict[str, Any]] = {}
    order: List[str] = []
    for r in rows:
        if r["optimizer"] not in order:
            order.append(r["optimizer"])
        key = (r["optimizer"], r["seed"])
        if key not in last or r["epoch"] >= last[key]["epoch"]:
            last[key] = r
    out = []
    for name in order:
        finals = [r for (o, _), r in last.items() if o == name]
        s: Dict[str, Any] = {"optimizer": name, "seeds": len(finals), "epochs": max(r["epoch"] for r in finals),
                             "diverged": sum(bool(r.get("diverged")) for r in finals)}
        for m in SUMMARY_METRICS:
            s[m + "_mean"], s[m + "_std"] = _mean_std([r[m] for r in finals])
        out.append(s)
    return out


def format_table(summary: Sequence[Dict[str, Any]], task: str = "classification") -> str:
    """A plain-text table: final metrics as mean ± std over seeds (accuracies in %)."""
    def pm(s, m, scale=1.0, fmt="{:.2f}"):
        mu, sd = s[m + "_mean"], s[m + "_std"]
        if mu is None or math.isnan(mu):
            return "-"
        if s["seeds"] < 2:
            return fmt.format(mu * scale)
        return f"{fmt.format(mu * scale)} ± {fmt.format(sd * scale)}"
    if task == "classification":
        cols = [("train acc %", "train_acc", 100.0, "{:.2f}"), ("val acc %", "val_acc", 100.0, "{:.2f}"),
                ("test acc %", "test_acc", 100.0, "{:.2f}"), ("train loss", "train_loss", 1.0, "{:.4f}"),
                ("test loss", "test_loss", 1.0, "{:.4f}")]
    else:
        cols = [("train loss", "train_loss", 1.0, "{:.5f}"), ("val loss", "val_loss", 1.0, "{:.5f}"),
                ("test loss", "test_loss", 1.0, "{:.5f}")]
    cols += [("train time s", "wall_time", 1.0, "{:.2f}")]
    header = ["optimizer", "seeds"] + [c[0] for c in cols] + ["backprops", "HVPs"]
    body = []
    for s in summary:
        bp, hv = s["backprops_mean"], s["hvps_mean"]
        body.append([s["optimizer"] + (f" ({s['diverged']} diverged)" if s["diverged"] else ""), str(s["seeds"])]
                    + [pm(s, m, sc, f) for _, m, sc, f in cols]
                    + ["-" if math.isnan(bp) else f"{bp:.0f}", "-" if math.isnan(hv) else f"{hv:.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in body])


# ----------------------------------------------------------------------------------- outputs
def _write_csv(path: Path, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def plot_curves(rows: Sequence[Dict[str, Any]], path: os.PathLike, title: str = "",
                task: str = "classification") -> None:
    """curves.png: mean over seeds (± std band) per optimizer of train/val loss and val/test
    accuracy by epoch, and train loss against gradient + HVP evaluations."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    has_val = any(not math.isnan(r["val_loss"]) for r in rows)
    split = "val" if has_val else "test"
    panels = [("train_loss", "epoch", "train loss", True), (f"{split}_loss", "epoch", f"{split} loss", True),
              ("train_loss", "cost", "train loss", True)]
    if task == "classification":
        panels += [(f"{split}_acc", "epoch", f"{split} accuracy", False),
                   ("test_acc" if has_val else "train_acc", "epoch",
                    "test accuracy" if has_val else "train accuracy", False)]
    else:
        panels += [("test_loss", "epoch", "test loss", True)]
    panels.append(("train_loss", "wall_time", "train loss", True))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (metric, xkey, ylabel, logy) in zip(axes, panels):
        for name in names:
            rs = [r for r in rows if r["optimizer"] == name]
            epochs = sorted({r["epoch"] for r in rs})
            xs, mus, sds = [], [], []
            for e in epochs:
                at = [r for r in rs if r["epoch"] == e]
                vals = [r[metric] for r in at if r[metric] is not None and math.isfinite(r[metric])]
                if not vals:
                    continue
                if xkey == "cost":
                    xs.append(statistics.fmean(r["backprops"] + r["hvps"] for r in at))
                else:
                    xs.append(statistics.fmean(r[xkey] for r in at))
                mu, sd = _mean_std(vals)
                mus.append(mu)
                sds.append(sd)
            if not xs:
                continue
            (ln,) = ax.plot(xs, mus, marker="o", markersize=2.5, label=name)
            if any(sd > 0 for sd in sds):
                ax.fill_between(xs, [m - s for m, s in zip(mus, sds)], [m + s for m, s in zip(mus, sds)],
                                color=ln.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel({"epoch": "epoch", "cost": "gradient + HVP evaluations", "wall_time": "train time (s)"}[xkey])
        ax.set_ylabel(ylabel)
        if logy and all(r[metric] is None or not math.isfinite(r[metric]) or r[metric] > 0 for r in rows):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, args: argparse.Namespace, rows, summary, meta: Dict[str, Any], task: str) -> Dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"history_csv": out / "history.csv", "summary_csv": out / "summary.csv", "json": out / "results.json",
             "table": out / "summary.txt"}
    _write_csv(files["history_csv"], rows, HISTORY_COLUMNS)
    sum_cols = ["optimizer", "seeds", "epochs", "diverged"] + [f"{m}_{s}" for m in SUMMARY_METRICS
                                                               for s in ("mean", "std")]
    _write_csv(files["summary_csv"], summary, sum_cols)
    table = format_table(summary, task)
    files["table"].write_text(table + "\n")
    doc = {"config": {k: v for k, v in vars(args).items()},
           "hyperparameters": {n: hyperparameters(args, n) for n in args.optimizer},
           "closure_convention": {n: cli_optimizers.get_spec(n).closure for n in args.optimizer},
           **meta, "history": rows, "summary": summary, "table": table}
    files["json"].write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    if args.plot:
        files["png"] = out / "curves.png"
        title = f"{meta['dataset']} {meta['model']} ({meta['subset_sizes']}), {len(args.seeds)} seed(s)"
        plot_curves(rows, files["png"], title, task)
    return {k: str(v) for k, v in files.items()}


# --------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train every optimizer in ``args.optimizer`` for every seed; write the outputs; return
    ``{"history": rows, "summary": [...], "table": str, "files": {...}, "out": folder}``."""
    log = (lambda s: print(s, flush=True)) if args.verbose else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 0 or args.batch_size < 1:
        raise ValueError("--epochs must be >= 0 and --batch-size >= 1")
    model_kw = dict(args.model_arg)
    build = lambda: models.get_model(args.model, in_channels=args.channels, image_size=args.image_size,
                                     num_classes=10, **model_kw)
    task = getattr(build(), "task", "classification")
    splits = data.load_splits(args.dataset, args.subset, seed=args.data_seed,
                              normalize=args.normalize and task == "classification",
                              size=args.image_size, channels=args.channels).to(args.device)
    run_name = args.run_name or "{}-{}-{}".format(args.dataset, args.model,
                                                  _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out = Path(args.out) if args.out else Path("results") / "train" / run_name
    sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
    if log:
        log(f"{args.dataset} {sizes} (train/val/test), model {args.model}, optimizers {', '.join(args.optimizer)}, "
            f"seeds {args.seeds}, {args.epochs} epochs of batch {args.batch_size} on {args.device}")
    rows: List[Dict[str, Any]] = []
    n_params = None
    for seed in args.seeds:
        torch.manual_seed(seed)
        init_state = copy.deepcopy(build().state_dict())   # same initial weights for every optimizer
        for name in args.optimizer:
            model = build()                                 # fresh module: no hooks left by a previous optimizer
            model.load_state_dict(init_state)
            model.to(args.device)
            n_params = models.num_parameters(model)
            rows.extend(train_one(args, name, model, splits, seed, task, log))
    summary = summarize(rows)
    meta = {"dataset": args.dataset, "model": args.model, "task": task, "parameters": n_params,
            "subset_sizes": sizes, "device": args.device,
            "device_name": (torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
                            or platform.machine()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    files = write_outputs(out, args, rows, summary, meta, task)
    table = format_table(summary, task)
    if log:
        log(f"\nfinal epoch, {'mean ± std over ' + str(len(args.seeds)) + ' seeds' if len(args.seeds) > 1 else '1 seed'}:")
        log(table + "\n")
        log(f"results in {out}/ ({', '.join(Path(f).name for f in files.values())})")
    return {"history": rows, "summary": summary, "table": table, "files": files, "out": str(out), "task": task}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except data.DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
