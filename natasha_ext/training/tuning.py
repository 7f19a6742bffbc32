"""Tuning one learning-rate-like hyperparameter per optimizer (the DeepOBS protocol of Schneider,
Balles and Hennig, "DeepOBS: A deep learning optimizer benchmark suite", ICLR 2019, Sec. 3):
the log grid, the selection rule, and the tuned table a program (the README demo) reads.

* What is tuned (:func:`tuned_flags`): ``lr`` for every optimizer that has one; the initial
  radius Delta_0 for the trust region and the initial cubic weight sigma_0 for ARC (both adapt
  from there by their ratio tests, so the grid mostly moves the first steps); for the Hybrid its
  SGD-momentum phase ``sgd_lr`` with the AdaHessian phase's ``lr`` scaled by the same factor.
* The grid (:func:`grid`): ``points`` values log-spaced over ``span`` decades centred on the
  optimizer's CLI default (default x 10^[-span/2, +span/2]), the same rule for every optimizer.
* The selection (:func:`select_best`): the highest validation accuracy at the end of training;
  ties go to the lower validation loss, then to the earlier grid point. A run whose loss went
  non-finite (diverged) ranks below every finite one and is never selected unless all diverged.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from natasha_ext import cli_optimizers

__all__ = ["tuned_flags", "grid", "select_best", "SELECTION_RULE", "TunedTableError", "TUNED_FORMAT",
           "read_tuned", "write_tuned", "as_per_optimizer"]

SELECTION_RULE = ("best validation accuracy at the end of training; ties -> lower validation loss -> earlier "
                  "grid point; diverged runs (non-finite loss) rank last")

_SPECIAL = {"trust-region": ("radius",), "arc": ("sigma",), "hybrid": ("sgd_lr", "lr")}


def tuned_flags(name: str) -> Tuple[str, ...]:
    """The flag(s) tuned for optimizer ``name``; the first is the grid's axis, the others move by
    the same factor."""
    spec = cli_optimizers.get_spec(name)
    flags = _SPECIAL.get(name, ("lr",))
    missing = [f for f in flags if f not in spec.flags]
    if missing:
        raise ValueError(f"optimizer {name} has no flag(s) {missing} to tune")
    return flags


def grid(name: str, points: int = 5, span: float = 3.0) -> List[Dict[str, float]]:
    """The tuning grid of optimizer ``name``: ``points`` settings ``{flag: value}``, each tuned
    flag at default x 10^e for e log-spaced over [-span/2, span/2]."""
    if not isinstance(points, int) or isinstance(points, bool) or points < 1:
        raise ValueError(f"points must be a positive integer, got {points!r}")
    if not (isinstance(span, (int, float)) and span >= 0 and math.isfinite(span)):
        raise ValueError(f"span must be a finite number of decades >= 0, got {span!r}")
    spec = cli_optimizers.get_spec(name)
    flags = tuned_flags(name)
    exps = [0.0] if points == 1 else [-span / 2 + span * i / (points - 1) for i in range(points)]
    return [{f: float(spec.default(f)) * 10.0 ** e for f in flags} for e in exps]


def _rank_key(result: Dict[str, Any]) -> Tuple[int, float, float]:
    acc, loss = result.get("val_acc"), result.get("val_loss")
    finite = (not result.get("diverged") and acc is not None and loss is not None
              and math.isfinite(acc) and math.isfinite(loss))
    return (0, -acc, loss) if finite else (1, 0.0, 0.0)


def select_best(results: Sequence[Dict[str, Any]]) -> int:
    """Index of the selected grid point (see :data:`SELECTION_RULE`); each result holds
    ``val_acc``, ``val_loss`` and ``diverged``."""
    if not results:
        raise ValueError("no tuning results to select from")
    return min(range(len(results)), key=lambda i: (_rank_key(results[i]), i))


# ---- the tuned table ----------------------------------------------------------------------------
TUNED_FORMAT = "natasha_ext tuned hyperparameters"


class TunedTableError(ValueError):
    """A tuned table that cannot be used; the message names the file."""


def write_tuned(path, problem: str, setting: str, settings: Dict[str, Dict[str, float]], source: str) -> None:
    """Write the table: ``settings`` optimizer -> {flag: value}; ``setting`` describes the
    problem's sizes, ``source`` the command that tuned it."""
    from natasha_ext.training.outputs import write_json

    doc = {"format": TUNED_FORMAT, "version": 1, "problem": problem, "setting": setting, "source": source,
           "selection": SELECTION_RULE, "optimizers": settings}
    _check(doc, Path(path))
    write_json(path, doc)


def read_tuned(path) -> Dict[str, Any]:
    """The checked table in ``path`` (the JSON :func:`write_tuned` writes); raises
    :class:`TunedTableError` naming the file and what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise TunedTableError(f"{path}: cannot read the tuned table: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise TunedTableError(f"{path}: not valid JSON ({e})") from None
    _check(doc, path)
    return doc


def _check(doc: Any, path: Path) -> None:
    def bad(msg: str):
        raise TunedTableError(f"{path}: malformed tuned table: {msg}")
    if not isinstance(doc, dict) or doc.get("format") != TUNED_FORMAT:
        bad(f"'format' must be {TUNED_FORMAT!r}")
    if doc.get("version") != 1:
        bad(f"'version' must be 1, got {doc.get('version')!r}")
    for key in ("problem", "setting", "source"):
        if not isinstance(doc.get(key), str):
            bad(f"{key!r} must be a string")
    opts = doc.get("optimizers")
    if not isinstance(opts, dict) or not opts:
        bad("'optimizers' must map optimizer names to {flag: value}")
    for name, values in opts.items():
        if name not in cli_optimizers.OPTIMIZERS:
            bad(f"unknown optimizer {name!r} (known: {sorted(cli_optimizers.OPTIMIZERS)})")
        if not isinstance(values, dict) or not values:
            bad(f"{name}: must be a non-empty {{flag: value}} object")
        for flag, v in values.items():
            if flag not in cli_optimizers.get_spec(name).flags:
                bad(f"{name} has no hyperparameter {flag!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                bad(f"{name}.{flag} must be a positive finite number, got {v!r}")


def as_per_optimizer(doc: Optional[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """The table's settings as :attr:`TrainConfig.per_optimizer` (empty without a table)."""
    return {k: dict(v) for k, v in (doc or {}).get("optimizers", {}).items()}
