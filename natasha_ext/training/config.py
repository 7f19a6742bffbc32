"""What one training run is: :class:`TrainConfig`, checked field by field when it is built.

Programs build it directly (``TrainConfig(model="lenet5", optimizers=["adam"], epochs=3,
hparams={"lr": 3e-4})``); the CLI builds the same object from its flags. A bad value raises
:class:`ConfigError` naming the field (the CLI turns it into an argparse error naming the flag).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch

from natasha_ext import cli_optimizers, data, models

__all__ = ["TrainConfig", "ConfigError", "parse_seeds", "RESUMABLE"]


class ConfigError(ValueError):
    """A bad training setting; ``field`` is the TrainConfig field (or hyperparameter flag) at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    @property
    def flag(self) -> str:
        name = {"optimizers": "optimizer", "model_args": "model-arg"}.get(self.field, self.field)
        return "--" + name.replace("_", "-")


def parse_seeds(text: str) -> List[int]:
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


#: fields that may change when a run is resumed (presentation only; everything else must match)
RESUMABLE = ("progress", "verbose", "plot")


@dataclass
class TrainConfig:
    """One training run: every optimizer in ``optimizers`` x every seed in ``seeds``.

    Defaults reproduce the AdaHessian/Hybrid paper's setting (MNIST, 1200/200/200 class-balanced
    split, ResNet-18 with a 1-channel stem, batch 100, 15 epochs). ``hparams`` holds optimizer
    hyperparameters by flag name (``{"lr": 0.1}``), applied to every optimizer that has the flag;
    the others keep their defaults (:mod:`natasha_ext.cli_optimizers`). ``per_optimizer`` holds
    hyperparameters of single optimizers (``{"sgd": {"lr": 0.05}}``, e.g. a tuned table); for a
    flag set in both, ``hparams`` wins (an explicit CLI flag overrides a tuned value)."""
    optimizers: List[str] = field(default_factory=lambda: ["sgd"])
    model: str = "resnet18"
    model_args: Dict[str, Any] = field(default_factory=dict)
    dataset: str = "mnist"
    subset: str = "1200/200/200"
    data_seed: int = 0
    image_size: int = 28
    channels: int = 1
    normalize: bool = True
    epochs: int = 15
    batch_size: int = 100
    eval_batch_size: int = 1000
    bootstrap: Optional[float] = None
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    threads: Optional[int] = None
    recon_loss: str = "mse"
    out: Optional[str] = None
    run_name: Optional[str] = None
    progress: bool = True
    plot: bool = True
    verbose: bool = True
    checkpoint: bool = True
    hparams: Dict[str, Any] = field(default_factory=dict)
    per_optimizer: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.optimizers, str):
            self.optimizers = [self.optimizers]
        if isinstance(self.seeds, (int, str)):
            try:
                self.seeds = parse_seeds(str(self.seeds))
            except argparse.ArgumentTypeError as e:
                raise ConfigError("seeds", str(e)) from None
        self.optimizers = _optimizer_names(self.optimizers)
        self.seeds = list(self.seeds)
        self.model_args = dict(self.model_args)
        self.hparams = dict(self.hparams)
        if not isinstance(self.per_optimizer, dict) or not all(isinstance(v, dict) for v in self.per_optimizer.values()):
            raise ConfigError("per_optimizer", f"must map optimizer names to {{flag: value}} dicts, "
                                               f"got {self.per_optimizer!r}")
        self.per_optimizer = {k: dict(v) for k, v in self.per_optimizer.items()}
        self.validate()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first bad field (cheap checks first, then the model
        and every optimizer are built once on probes so that their own checks run too)."""
        _int_at_least(self, "epochs", 0)
        for name in ("batch_size", "eval_batch_size"):
            _int_at_least(self, name, 1)
        _int_at_least(self, "image_size", 8)
        _int_at_least(self, "data_seed", 0)
        if self.threads is not None:
            _int_at_least(self, "threads", 1)
        _choice(self, "dataset", sorted(data.DATASETS))
        _choice(self, "channels", (1, 3))
        _choice(self, "recon_loss", ("mse", "bce"))
        _choice(self, "device", ("cpu", "cuda"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "cuda was asked for but torch.cuda.is_available() is False")
        if self.bootstrap is not None and not (isinstance(self.bootstrap, (int, float)) and 0 < self.bootstrap
                                               and math.isfinite(self.bootstrap)):
            raise ConfigError("bootstrap", f"must be a fraction > 0, got {self.bootstrap!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ConfigError("seeds", f"must be non-negative integers, got {self.seeds!r}")
        for name in ("normalize", "progress", "plot", "verbose", "checkpoint"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be True or False, got {getattr(self, name)!r}")
        try:
            data.subset_sizes(self.dataset, self.subset)
        except ValueError as e:
            raise ConfigError("subset", str(e)) from None
        try:
            self.build_model()
        except (TypeError, ValueError) as e:
            raise ConfigError("model" if "model must be" in str(e) else "model_args",
                              f"{self.model} with {self.model_args}: {e}") from None
        self._check_hparams()

    def _check_hparams(self) -> None:
        table = cli_optimizers.flag_table()
        for k in self.hparams:
            if k not in table:
                raise ConfigError(k, f"no optimizer has this hyperparameter (known: {sorted(table)})")
            if not any(k in cli_optimizers.get_spec(o).flags for o in self.optimizers):
                raise ConfigError(k, f"does not apply to {', '.join(self.optimizers)} "
                                     f"(it is a flag of {', '.join(sorted(table[k]))})")
        for name, values in self.per_optimizer.items():
            if name not in cli_optimizers.OPTIMIZERS:
                raise ConfigError("per_optimizer", f"optimizer must be one of {sorted(cli_optimizers.OPTIMIZERS)}, "
                                                   f"got {name!r}")
            unknown = sorted(set(values) - set(cli_optimizers.get_spec(name).flags))
            if unknown:
                raise ConfigError("per_optimizer", f"{name} has no hyperparameter(s) {unknown}")
        for name in self.optimizers:
            given = {**self.per_optimizer.get(name, {}), **self.hparams}
            bad = cli_optimizers.check_hyperparameters(name, given, self.build_namespace(0))
            if bad is not None:
                flags, msg = bad
                where = "hparams" if len(flags) > 1 else ("per_optimizer" if flags[0] not in self.hparams else flags[0])
                raise ConfigError(where, f"{name} rejects {', '.join(f'{f}={given[f]!r}' for f in flags)}: {msg}")

    # ---------------------------------------------------------------------------- helpers
    def for_optimizer(self, name: str, **hparams) -> "TrainConfig":
        """The config of one run of optimizer ``name`` with these hyperparameters added (e.g. one
        configuration of a paper's table); ``hparams`` of other optimizers are left out."""
        spec = cli_optimizers.get_spec(name)
        kept = {k: v for k, v in self.hparams.items() if k in spec.flags}
        return dataclasses.replace(self, optimizers=[name], hparams={**kept, **hparams})

    def hyperparameters(self, name: str) -> Dict[str, Any]:
        """The hyperparameters optimizer ``name`` runs with: ``hparams``, else ``per_optimizer[name]``,
        else its defaults."""
        spec = cli_optimizers.get_spec(name)
        own = self.per_optimizer.get(name, {})
        return {k: self.hparams.get(k, own.get(k, spec.default(k))) for k in spec.flags}

    def build_namespace(self, seed: int, name: Optional[str] = None, **hparams) -> SimpleNamespace:
        """What :meth:`OptimizerSpec.build` reads: the run's settings, ``seed`` and (with ``name``)
        that optimizer's hyperparameters, ``hparams`` last."""
        run = {k: v for k, v in vars(self).items() if k not in ("hparams", "per_optimizer")}
        hp = self.hyperparameters(name) if name is not None else {}
        return SimpleNamespace(**{**run, **hp, **hparams, "seed": seed})

    def build_model(self) -> torch.nn.Module:
        return models.get_model(self.model, in_channels=self.channels, image_size=self.image_size, num_classes=10,
                                **self.model_args)

    def out_dir(self) -> Path:
        """``out``, else results/train/<run_name> (run_name defaults to dataset-model-time)."""
        if self.out:
            return Path(self.out)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("results") / "train" / (self.run_name or f"{self.dataset}-{self.model}-{stamp}")

    def to_json(self) -> Dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(doc) - known
        if unknown:
            raise ConfigError("resume", f"the saved config has unknown fields {sorted(unknown)}")
        doc = dict(doc)
        doc["model_args"] = {k: tuple(v) if isinstance(v, list) else v for k, v in doc.get("model_args", {}).items()}
        return cls(**doc)

    def differences(self, other: "TrainConfig") -> List[str]:
        """Fields (other than the presentation ones) in which ``other`` differs."""
        mine, theirs = self.to_json(), other.to_json()
        return [k for k in mine if k not in RESUMABLE and mine[k] != theirs[k]]


def _optimizer_names(raw) -> List[str]:
    names: List[str] = []
    for item in raw:
        for n in str(item).split(","):
            n = n.strip()
            if not n:
                continue
            if n == "all":
                names.extend(x for x in cli_optimizers.OPTIMIZERS if x not in names)
                continue
            if n not in cli_optimizers.OPTIMIZERS:
                raise ConfigError("optimizers", f"optimizer must be one of {sorted(cli_optimizers.OPTIMIZERS)}, "
                                                f"got {n!r}")
            if n not in names:
                names.append(n)
    if not names:
        raise ConfigError("optimizers", "no optimizer given")
    return names


def _int_at_least(cfg, name: str, lo: int) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(name, f"must be an integer >= {lo}, got {v!r}")


def _choice(cfg, name: str, choices) -> None:
    v = getattr(cfg, name)
    if v not in choices:
        raise ConfigError(name, f"must be one of {list(choices)}, got {v!r}")
