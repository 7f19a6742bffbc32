"""Result files of a training run: history.csv (appended and flushed per epoch), results.json
(rewritten atomically per epoch), summary.csv / summary.txt and curves.png at the end (or at an
interrupt: everything but the plot). Every whole-file write goes to a temporary file that then
replaces the target, so an interrupt never leaves a half-written file behind."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["HISTORY_COLUMNS", "atomic_write", "write_csv", "json_safe", "write_json", "check_writable",
           "RunFiles"]

#: columns of history.csv, one row per (optimizer, seed, epoch); epoch 0 is the initial model
HISTORY_COLUMNS = ["optimizer", "seed", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
                   "test_acc", "minibatch_loss", "wall_time", "epoch_time", "steps", "backprops", "hvps",
                   "closure_calls", "skipped_steps", "lr"]


def atomic_write(path: os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename over ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _csv_text(rows: Sequence[Dict[str, Any]], columns: Sequence[str], header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(path: os.PathLike, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    text = _csv_text(rows, columns)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def json_safe(obj):
    """NaN/inf -> None, tuples -> lists, unknown objects -> str (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: os.PathLike, doc: Any) -> None:
    text = json.dumps(json_safe(doc), indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written in it; raises OSError otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


class RunFiles:
    """The files of one run folder, kept current while it trains.

    ``add(row, new)`` appends a history row to history.csv (flushed) and, for a newly trained
    epoch, rewrites results.json; ``finish(status, ...)`` writes the summary files."""

    def __init__(self, out: Path, header: Dict[str, Any]):
        self.out = out
        self.header = header          # config, hyperparameters, meta: the top of results.json
        self.rows: List[Dict[str, Any]] = []
        self.files = {"history_csv": out / "history.csv", "summary_csv": out / "summary.csv",
                      "json": out / "results.json", "table": out / "summary.txt"}
        self._history = open(self.files["history_csv"], "w", newline="")
        self._history.write(_csv_text([], HISTORY_COLUMNS))
        self._history.flush()

    def add(self, row: Dict[str, Any], new: bool = True) -> None:
        self.rows.append(row)
        self._history.write(_csv_text([row], HISTORY_COLUMNS, header=False))
        self._history.flush()
        if new:
            write_json(self.files["json"], {**self.header, "status": "running", "history": self.rows})

    def finish(self, status: str, summary: List[Dict[str, Any]], table: str, columns: Sequence[str],
               extra: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
        """Close the history (rewritten whole, so a row cut by an interrupt is repaired) and write
        summary.csv, summary.txt and results.json with ``status``."""
        self._history.close()
        write_csv(self.files["history_csv"], self.rows, HISTORY_COLUMNS)
        write_csv(self.files["summary_csv"], summary, columns)
        atomic_write(self.files["table"], lambda tmp: Path(tmp).write_text(table + "\n"))
        write_json(self.files["json"], {**self.header, **(extra or {}), "status": status, "history": self.rows,
                                        "summary": summary, "table": table})
        return {k: str(v) for k, v in self.files.items()}
