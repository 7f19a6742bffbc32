"""A whole run: every optimizer x every seed of a :class:`TrainConfig`, with its result folder.

The folder is created and proven writable before any data is loaded. Rows reach history.csv as
epochs finish; results.json is rewritten per epoch; each (optimizer, seed) pair keeps a
checkpoint (``checkpoints/``) so that ``run(config, resume=True)`` continues an interrupted
run bit-identically. An interrupt (Ctrl-C) writes the summary of what finished and raises
:class:`Interrupted`; an error does the same (status "failed") and re-raises.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict

import torch

from natasha_ext import cli_optimizers, data, models
from natasha_ext.training.checkpoint import RunCheckpoint
from natasha_ext.training.config import ConfigError, TrainConfig
from natasha_ext.training.loop import train_one
from natasha_ext.training.outputs import RunFiles, check_writable, write_json
from natasha_ext.training.summary import SUMMARY_COLUMNS, format_table, summarize

__all__ = ["run", "Interrupted", "load_config"]

CONFIG_FILE = "config.json"


class Interrupted(KeyboardInterrupt):
    """The run was interrupted; ``out`` holds the finished epochs and the checkpoints."""

    def __init__(self, out: Path, rows: int):
        super().__init__(f"interrupted; {rows} history rows kept in {out}")
        self.out = out
        self.rows = rows


def load_config(out: Path) -> TrainConfig:
    """The config of the run saved in folder ``out``."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError("resume", f"{out} holds no {CONFIG_FILE}: not a training run folder")
    return TrainConfig.from_json({**json.loads(path.read_text()), "out": str(out)})


def _prepare(config: TrainConfig, out: Path, resume: bool) -> None:
    try:
        check_writable(out)
    except OSError as e:
        raise ConfigError("out", f"cannot write results to {out}: {e.strerror or e}") from None
    if resume:
        if not config.checkpoint:
            raise ConfigError("resume", f"the run in {out} kept no checkpoints (--no-checkpoint): nothing to resume")
        diff = load_config(out).differences(config)
        if diff:
            raise ConfigError("resume", f"the run in {out} was made with other settings ({', '.join(diff)}); "
                                        "a resumed run keeps its settings")
        return
    for stale in (out / "checkpoints").glob("*.pt"):       # a fresh run must not resume an older one's runs
        stale.unlink()
    write_json(out / CONFIG_FILE, config.to_json())


def run(config: TrainConfig, *, resume: bool = False) -> Dict[str, Any]:
    """Train every optimizer in ``config.optimizers`` for every seed; write the outputs; return
    ``{"history": rows, "summary": [...], "table": str, "files": {...}, "out": folder, "task": ...}``.
    ``resume``: continue the run saved in ``config.out`` (same settings) from its checkpoints."""
    from tqdm.auto import tqdm

    out = config.out_dir()
    if resume and not config.out:
        raise ConfigError("out", "resuming needs the run's folder")
    _prepare(config, out, resume)
    if config.threads:
        torch.set_num_threads(config.threads)
    build = config.build_model
    task = getattr(build(), "task", "classification")
    splits = data.load_splits(config.dataset, config.subset, seed=config.data_seed,
                              normalize=config.normalize and task == "classification",
                              size=config.image_size, channels=config.channels).to(config.device)
    sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
    meta = {"dataset": config.dataset, "model": config.model, "task": task, "parameters": models.num_parameters(build()),
            "subset_sizes": sizes, "device": config.device,
            "device_name": (torch.cuda.get_device_name() if config.device == "cuda" else platform.processor()
                            or platform.machine()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    files = RunFiles(out, {"config": config.to_json(),
                           "hyperparameters": {n: config.hyperparameters(n) for n in config.optimizers},
                           "closure_convention": {n: cli_optimizers.get_spec(n).closure for n in config.optimizers},
                           **meta})
    bar = tqdm(total=len(config.seeds) * len(config.optimizers) * config.epochs, desc="epochs", unit="epoch",
               disable=not config.progress, dynamic_ncols=True, position=0)
    say = (tqdm.write if config.progress else lambda s: print(s, flush=True)) if config.verbose else None
    if say:
        say(f"{config.dataset} {sizes} (train/val/test), model {config.model}, optimizers "
            f"{', '.join(config.optimizers)}, seeds {config.seeds}, {config.epochs} epochs of batch "
            f"{config.batch_size} on {config.device}" + (f"; resuming {out}" if resume else ""))

    def on_row(row, new):
        files.add(row, new)
        bar.update(1 if row["epoch"] > 0 else 0)

    try:
        for seed in config.seeds:
            torch.manual_seed(seed)
            init_state = copy.deepcopy(build().state_dict())   # same initial weights for every optimizer
            for name in config.optimizers:
                model = build()                                 # fresh module: no hooks left by a previous optimizer
                model.load_state_dict(init_state)
                model.to(config.device)
                ckpt = (RunCheckpoint(out / "checkpoints" / f"{name}-seed{seed}.pt", resume)
                        if config.checkpoint else None)
                train_one(config, name, model, splits, seed, task, say, checkpoint=ckpt, on_row=on_row)
    except KeyboardInterrupt:
        bar.close()
        _finish(files, "interrupted", task)
        raise Interrupted(out, len(files.rows)) from None
    except Exception:                  # e.g. an optimizer's NonFiniteError: keep what finished, then raise
        bar.close()
        _finish(files, "failed", task)
        raise
    bar.close()
    summary, table, paths = _finish(files, "finished", task)
    if config.plot:
        from natasha_ext.training.plots import plot_curves

        paths["png"] = str(out / "curves.png")
        title = f"{config.dataset} {config.model} ({sizes}), {len(config.seeds)} seed(s)"
        plot_curves(files.rows, paths["png"], title, task)
    if say:
        say(f"\nfinal epoch, {'mean ± std over ' + str(len(config.seeds)) + ' seeds' if len(config.seeds) > 1 else '1 seed'}:")
        say(table + "\n")
        say(f"results in {out}/ ({', '.join(Path(f).name for f in paths.values())})")
    return {"history": files.rows, "summary": summary, "table": table, "files": paths, "out": str(out), "task": task}


def _finish(files: RunFiles, status: str, task: str):
    summary = summarize(files.rows)
    table = format_table(summary, task)
    return summary, table, files.finish(status, summary, table, SUMMARY_COLUMNS)
