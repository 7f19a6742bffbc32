"""The command line: ``python -m natasha_ext.train`` / ``natasha-train``.

    python -m natasha_ext.train --optimizer sgd sgd-momentum adam --model lenet5 --epochs 5
    python -m natasha_ext.train --resume results/train/mnist-lenet5-20260101-120000

Every flag is a :class:`~natasha_ext.training.config.TrainConfig` field or an optimizer
hyperparameter (:mod:`natasha_ext.cli_optimizers`); a bad value is an argparse error naming the
flag (exit 2). Ctrl-C writes the summary of the finished epochs and exits 130; ``--resume DIR``
continues that run from its checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, NamedTuple, Optional, Sequence, Tuple

from natasha_ext import cli_optimizers, data, models
from natasha_ext.training.config import RESUMABLE, ConfigError, TrainConfig, parse_seeds
from natasha_ext.training.runner import Interrupted, load_config, run

__all__ = ["build_parser", "parse_args", "Command", "main"]

PROG = "python -m natasha_ext.train"


class Command(NamedTuple):
    config: TrainConfig
    resume: bool


def _model_arg(text: str) -> Tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE (VALUE as JSON), got {text!r}")
    k, v = text.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, list):
        val = tuple(val)
    return k.strip().replace("-", "_"), val


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the optimizer flags' None (their help lists per-optimizer defaults)."""

    def _get_help_string(self, action):
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser(defaults: Optional[TrainConfig] = None) -> argparse.ArgumentParser:
    """The CLI's parser; ``defaults`` (a TrainConfig) supplies the defaults (e.g. a demo's)."""
    d = defaults or TrainConfig()
    names = list(cli_optimizers.OPTIMIZERS)
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Train a zoo model on offline MNIST / Fashion-MNIST with one or more optimizers.",
        epilog="CLI defaults that differ from the optimizer classes' defaults, and why:\n"
               + cli_optimizers.defaults_table().replace("%", "%%"))
    p.add_argument("--optimizer", "--optimizers", dest="optimizers", nargs="+", default=d.optimizers, metavar="NAME",
                   help=f"one or more of: {', '.join(names)} (comma-separated also works; 'all' = every one)")
    p.add_argument("--model", default=d.model, help=f"one of {sorted(models.MODELS)}")
    p.add_argument("--model-arg", dest="model_args", action="append", type=_model_arg,
                   default=list(d.model_args.items()), metavar="KEY=VALUE",
                   help="extra model constructor argument, VALUE as JSON (e.g. hidden=[64], stem=\"small\")")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), default=d.dataset)
    p.add_argument("--subset", default=d.subset,
                   help="TRAIN/VAL/TEST sizes, class-balanced ('all' allowed; presets: adahessian, full)")
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the subset draw (same split for every seed)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="28, or 32 (zero-padded)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels)
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=d.normalize,
                   help="standardise pixels with the training-set mean/std (classification models)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--bootstrap", type=float, default=d.bootstrap, metavar="FRACTION",
                   help="each epoch, resample FRACTION x N training examples with replacement "
                        "(the Natasha report uses 0.1) instead of one pass over a permutation")
    p.add_argument("--seeds", type=parse_seeds, default=d.seeds,
                   help="seeds of the initial weights and minibatch order: '0', '0,1,2' or '0-9'")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--recon-loss", choices=("mse", "bce"), default=d.recon_loss,
                   help="reconstruction loss of the autoencoder (on sigmoid outputs / logits)")
    p.add_argument("--out", default=d.out, help="results folder (default results/train/<run-name>)")
    p.add_argument("--run-name", default=d.run_name)
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the interrupted run in DIR from its checkpoints, with its saved settings")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=d.checkpoint,
                   help="keep a checkpoint of every run after each epoch (what --resume continues from)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="tqdm progress bars")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=d.plot, help="write curves.png")
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=d.verbose,
                   help="print one line per epoch and the summary table")

    general = {a.dest for a in p._actions}
    hp = p.add_argument_group("optimizer hyperparameters (the default depends on the optimizer)")
    for flag_name, per_opt in cli_optimizers.flag_table().items():
        if flag_name in general:
            raise ValueError(f"optimizer flag {flag_name!r} collides with a general training flag; rename it")
        shown = ", ".join(f"{o}={cli_optimizers.get_spec(o).default(flag_name)}" for o in per_opt)
        helps = sorted({f.help for f in per_opt.values() if f.help})
        choices = next((f.choices for f in per_opt.values() if f.choices), None)
        kind = cli_optimizers.flag_type(flag_name)
        opt = "--" + flag_name.replace("_", "-")
        text = (f"{'; '.join(helps)} [default: {shown}]" if helps else f"[default: {shown}]").replace("%", "%%")
        default = d.hparams.get(flag_name)
        if kind is bool:
            hp.add_argument(opt, dest=flag_name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            hp.add_argument(opt, dest=flag_name, type=kind, choices=choices, default=default, metavar="X", help=text)
    return p


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[TrainConfig] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> Command:
    """Parse CLI arguments (``argv=None`` reads sys.argv) into a checked :class:`Command`; a bad
    value exits through ``parser.error`` (status 2) naming its flag."""
    parser = parser or build_parser(defaults)
    ns = parser.parse_args(list(argv) if argv is not None else None)
    hp_names = set(cli_optimizers.flag_table())
    if ns.resume is not None:
        given = [a.option_strings[0] for a in parser._actions
                 if a.dest not in ("help", "resume", *RESUMABLE) and getattr(ns, a.dest, None) != a.default]
        if given:
            parser.error(f"argument --resume: a resumed run keeps the settings saved in {ns.resume}; "
                         f"drop {', '.join(given)}")
        try:
            saved = load_config(ns.resume)
        except (ConfigError, OSError, ValueError) as e:
            parser.error(f"argument --resume: {getattr(e, 'message', e)}")
        return Command(dataclasses.replace(saved, **{k: getattr(ns, k) for k in RESUMABLE}), True)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(ns).items() if k in fields}
    kw["model_args"] = dict(ns.model_args)
    kw["hparams"] = {k: v for k, v in vars(ns).items() if k in hp_names and v is not None}
    kw["per_optimizer"] = (defaults or TrainConfig()).per_optimizer      # no flag: a program's own table
    try:
        return Command(TrainConfig(**kw), False)
    except ConfigError as e:
        parser.error(f"argument {e.flag}: {e.message}")


def main(argv: Optional[Sequence[str]] = None, defaults: Optional[TrainConfig] = None) -> int:
    """The CLI: 0 when done, 2 for a bad argument or a missing/corrupt dataset, 130 on Ctrl-C."""
    parser = build_parser(defaults)
    config, resume = parse_args(argv, defaults, parser=parser)
    try:
        run(config, resume=resume)
    except ConfigError as e:                     # found when the run starts (e.g. --out not writable)
        parser.error(f"argument {e.flag}: {e.message}")
    except (data.DatasetNotFoundError, data.DatasetCorruptError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"\ninterrupted: the finished epochs are in {e.out}/ (history.csv, summary.txt, results.json); "
              f"continue with: {PROG} --resume {e.out}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted before training started; nothing written", file=sys.stderr)
        return 130
    return 0
