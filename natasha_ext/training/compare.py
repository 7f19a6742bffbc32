"""A tuned, seeded comparison of every registered optimizer (the DeepOBS protocol of Schneider,
Balles and Hennig, ICLR 2019): per problem and optimizer, tune the learning-rate-like flag on a
log grid with one seed (:mod:`~natasha_ext.training.tuning`), then train the selected setting
with fresh seeds. Every run goes through :func:`~natasha_ext.training.loop.train_one`.

Files in the output folder, written as runs finish (an interrupted run keeps what finished):

* ``history.csv``: one row per (problem, phase, optimizer, setting, seed, epoch), appended and flushed;
* ``tuning.csv``: one row per grid point (final metrics, diverged, selected);
* ``final.csv``: one row per final-phase run (metrics, cost, cost to the target);
* ``kicks.csv``: every Natasha2 kick of the final runs (loss before/after, see :mod:`.kicks`);
* ``results.json``: all of the above and the settings, rewritten after every run;
* at the end (or an interrupt): ``summary.md`` (:mod:`.compare_report`) and ``tuning-<problem>.png``.
"""
from __future__ import annotations

import copy
import datetime as _dt
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from natasha_ext import cli_optimizers, data
from natasha_ext.training import tuning
from natasha_ext.training.config import TrainConfig
from natasha_ext.training.kicks import KICK_COLUMNS, KickProbe
from natasha_ext.training.loop import train_one
from natasha_ext.training.outputs import HISTORY_COLUMNS, check_writable, json_safe, write_json

__all__ = ["Problem", "PROBLEMS", "CompareSettings", "Interrupted", "run_compare", "to_target"]


@dataclass(frozen=True)
class Problem:
    """One test problem: data, model, and the budget of its short (CPU) and ``--full`` runs.
    ``target``: the validation accuracy whose first reaching is the "cost to target"."""
    dataset: str
    model: str
    model_args: Dict[str, Any]
    subset: str
    epochs: int
    batch_size: int
    target: float
    full_subset: str
    full_epochs: int
    full_batch_size: int
    full_target: float


PROBLEMS: Dict[str, Problem] = {     # sizes: see the time budget in python/compare.py's docstring
    "lenet5-mnist": Problem("mnist", "lenet5", {}, "2000/500/1000", 4, 50, 0.90, "all/5000/all", 10, 128, 0.985),
    "lenet5-fashion": Problem("fashion-mnist", "lenet5", {}, "2000/500/1000", 4, 50, 0.70, "all/5000/all", 10, 128,
                              0.88),
    "mlp-mnist": Problem("mnist", "mlp", {"hidden": (128,)}, "4000/500/1000", 4, 50, 0.90, "all/5000/all", 10, 128,
                         0.975),
}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: ``out`` holds what finished, and its summary."""

    def __init__(self, out: Path, runs: int):
        super().__init__(f"interrupted after {runs} runs; results in {out}")
        self.out, self.runs = out, runs


@dataclass
class CompareSettings:
    problems: List[str] = field(default_factory=lambda: list(PROBLEMS))
    optimizers: List[str] = field(default_factory=lambda: list(cli_optimizers.OPTIMIZERS))
    grid_points: int = 5
    span: float = 3.0
    tune_seed: int = 0
    seeds: List[int] = field(default_factory=lambda: [1, 2, 3])
    full: bool = False
    subset: Optional[str] = None        # overrides every problem's subset / epochs (tests, calibration)
    epochs: Optional[int] = None
    device: str = "cpu"
    threads: Optional[int] = None
    out: str = "results/compare"
    progress: bool = True
    plot: bool = True
    kick_probe_size: int = 500

    def __post_init__(self):
        unknown = [p for p in self.problems if p not in PROBLEMS]
        if unknown or not self.problems:
            raise ValueError(f"problems must be among {sorted(PROBLEMS)}, got {self.problems!r}")
        for name in self.optimizers:
            cli_optimizers.get_spec(name)
        if not self.optimizers:
            raise ValueError("optimizers: none given")
        tuning.grid(self.optimizers[0], self.grid_points, self.span)       # checks points and span
        if not self.seeds or self.tune_seed in self.seeds:
            raise ValueError(f"seeds must be fresh (not the tuning seed {self.tune_seed}), got {self.seeds!r}")

    def config(self, problem: str) -> TrainConfig:
        """The training config of one problem (one optimizer set later by ``for_optimizer``)."""
        p = PROBLEMS[problem]
        return TrainConfig(
            dataset=p.dataset, model=p.model, model_args=dict(p.model_args),
            subset=self.subset or (p.full_subset if self.full else p.subset),
            epochs=self.epochs or (p.full_epochs if self.full else p.epochs),
            batch_size=p.full_batch_size if self.full else p.batch_size, device=self.device, threads=self.threads,
            progress=False, verbose=False, plot=False, checkpoint=False)

    def target(self, problem: str) -> float:
        p = PROBLEMS[problem]
        return p.full_target if self.full else p.target


#: columns of tuning.csv / final.csv
TUNING_COLUMNS = ["problem", "optimizer", "flag", "value", "seed", "val_acc", "val_loss", "test_acc", "test_loss",
                  "train_loss", "diverged", "error", "wall_time", "run_cpu_time", "backprops", "hvps", "selected"]
FINAL_COLUMNS = ["problem", "optimizer", "flag", "value", "seed", "test_acc", "test_loss", "val_acc", "val_loss",
                 "train_loss", "diverged", "error", "wall_time", "run_cpu_time", "backprops", "hvps", "target",
                 "epochs_to_target", "time_to_target", "backprops_to_target", "hvps_to_target", "kicks", "oja_runs"]
HISTORY = ["problem", "phase", "value"] + HISTORY_COLUMNS


def to_target(rows: Sequence[Dict[str, Any]], target: float) -> Dict[str, float]:
    """Epoch, train time, backprops and HVPs at the first epoch whose validation accuracy reaches
    ``target`` (NaN when none does): the cost to target, at epoch resolution."""
    for r in rows:
        if r["val_acc"] is not None and r["val_acc"] >= target:
            return {"epochs_to_target": r["epoch"], "time_to_target": r["wall_time"],
                    "backprops_to_target": r["backprops"], "hvps_to_target": r["hvps"]}
    return {k: math.nan for k in ("epochs_to_target", "time_to_target", "backprops_to_target", "hvps_to_target")}


class _AppendCsv:
    """A CSV file that gets one flushed line per row (header first)."""

    def __init__(self, path: Path, columns: Sequence[str]):
        import csv

        self._f = open(path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        self._w.writeheader()
        self._f.flush()

    def add(self, row: Dict[str, Any]) -> None:
        self._w.writerow(row)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _train(settings: CompareSettings, problem: str, name: str, point: Dict[str, float], seed: int, splits,
           init_state, build, phase: str, history: _AppendCsv, probe: Optional[KickProbe]) -> Dict[str, Any]:
    """One run; returns its result row (final-epoch metrics, diverged / error) and its history."""
    config = settings.config(problem).for_optimizer(name, **point)
    model = build()
    model.load_state_dict(init_state)
    model.to(settings.device)
    flag = next(iter(point))
    value = point[flag]
    error = ""
    rows: List[Dict[str, Any]] = []

    def on_row(row, new):
        rows.append(row)
        history.add({**row, "problem": problem, "phase": phase, "value": value})

    cpu0 = time.process_time()
    try:
        train_one(config, name, model, splits, seed, on_row=on_row, observer=probe)
    except (RuntimeError, ValueError, FloatingPointError) as e:      # e.g. a Cholesky of a blown-up factor
        error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    last = rows[-1] if rows else {}
    diverged = bool(error) or bool(last.get("diverged")) or not all(
        isinstance(last.get(k), float) and math.isfinite(last[k]) for k in ("train_loss", "val_loss"))
    result = {"problem": problem, "optimizer": name, "flag": flag, "value": value, "seed": seed,
              "diverged": diverged, "error": error, "point": dict(point),
              "run_cpu_time": time.process_time() - cpu0}     # training + evaluation, all threads
    for k in ("val_acc", "val_loss", "test_acc", "test_loss", "train_loss", "wall_time", "backprops", "hvps"):
        result[k] = last.get(k, math.nan)
    return result, rows


def run_compare(settings: CompareSettings, *, say=print, write_tuned: Optional[str] = None,
                command: str = "") -> Dict[str, Any]:
    """The whole comparison; returns the results document (also in ``out/results.json``).
    Ctrl-C writes the summary of what finished and raises :class:`Interrupted`."""
    from tqdm.auto import tqdm

    from natasha_ext.training import compare_report

    out = Path(settings.out)
    check_writable(out)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    doc: Dict[str, Any] = {
        "settings": json_safe(asdict(settings)), "selection": tuning.SELECTION_RULE, "command": command,
        "created": _dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "problems": {p: {**json_safe(asdict(PROBLEMS[p])), "config": settings.config(p).to_json(),
                         "target": settings.target(p)} for p in settings.problems},
        "grids": {n: tuning.grid(n, settings.grid_points, settings.span) for n in settings.optimizers},
        "tuning": [], "final": [], "final_history": [], "kicks": [], "oja": [], "status": "running"}
    files = {"history": _AppendCsv(out / "history.csv", HISTORY), "tuning": _AppendCsv(out / "tuning.csv", TUNING_COLUMNS),
             "final": _AppendCsv(out / "final.csv", FINAL_COLUMNS), "kicks": _AppendCsv(out / "kicks.csv",
                                                                                       ["problem", "seed"] + KICK_COLUMNS)}
    n_runs = len(settings.problems) * len(settings.optimizers) * (settings.grid_points + len(settings.seeds))
    bar = tqdm(total=n_runs, desc="runs", unit="run", disable=not settings.progress, dynamic_ncols=True)
    log = tqdm.write if settings.progress else say
    status = "finished"
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        for problem in settings.problems:
            _run_problem(settings, problem, doc, files, bar, log, out)
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        bar.close()
        for f in files.values():
            f.close()
        doc["status"] = status
        doc["wall_seconds"], doc["cpu_seconds"] = time.perf_counter() - wall0, time.process_time() - cpu0
        doc["files"] = compare_report.write_report(doc, out, plot=settings.plot)
        write_json(out / "results.json", doc)
    if status == "interrupted":
        raise Interrupted(out, len(doc["tuning"]) + len(doc["final"]))
    if write_tuned:
        write_tuned_table(doc, write_tuned)
        say(f"tuned table written to {write_tuned}")
    return doc


def _run_problem(settings, problem, doc, files, bar, log, out) -> None:
    config = settings.config(problem)
    build = config.build_model
    splits = data.load_splits(config.dataset, config.subset, seed=config.data_seed).to(settings.device)
    sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
    doc["problems"][problem]["sizes"] = sizes
    log(f"{problem}: {config.dataset} {sizes} (train/val/test), {config.model}, {config.epochs} epochs of batch "
        f"{config.batch_size}; tuning with seed {settings.tune_seed}, final seeds {settings.seeds}")
    torch.manual_seed(settings.tune_seed)
    inits = {settings.tune_seed: copy.deepcopy(build().state_dict())}     # same start for every optimizer
    for seed in settings.seeds:
        torch.manual_seed(seed)
        inits[seed] = copy.deepcopy(build().state_dict())
    for name in settings.optimizers:
        results = []
        for point in doc["grids"][name]:
            res, _ = _train(settings, problem, name, point, settings.tune_seed, splits, inits[settings.tune_seed],
                            build, "tune", files["history"], None)
            results.append(res)
            bar.update(1)
            log(f"  [{problem} {name}] tune {res['flag']}={res['value']:.3g}: val_acc {res['val_acc']:.4f} "
                f"val_loss {res['val_loss']:.4f}" + (" (diverged)" if res["diverged"] else ""))
        best = tuning.select_best(results)
        for i, res in enumerate(results):
            res["selected"] = i == best
            files["tuning"].add(res)
            doc["tuning"].append(res)
        write_json(out / "results.json", doc)
        point = results[best]["point"]
        log(f"  [{problem} {name}] selected {results[best]['flag']}={results[best]['value']:.3g}")
        for seed in settings.seeds:
            probe = KickProbe(settings.kick_probe_size)
            res, rows = _train(settings, problem, name, point, seed, splits, inits[seed], build, "final",
                               files["history"], probe)
            res.update(to_target(rows, settings.target(problem)), target=settings.target(problem),
                       kicks=probe.counters.get("kicks", math.nan), oja_runs=probe.counters.get("oja_runs", math.nan))
            for k in probe.kicks:
                files["kicks"].add({**k, "problem": problem, "seed": seed})
                doc["kicks"].append({**k, "problem": problem, "optimizer": name, "seed": seed})
            delta = config.for_optimizer(name, **point).hyperparameters(name).get("delta", math.nan)
            doc["oja"].extend({"problem": problem, "optimizer": name, "seed": seed, "rayleigh": rq,
                               "threshold": -delta / 2} for rq in probe.rayleighs)
            files["final"].add(res)
            doc["final"].append(res)
            doc["final_history"].extend({**r, "problem": problem} for r in rows)
            write_json(out / "results.json", doc)
            bar.update(1)
            log(f"  [{problem} {name}] seed {seed}: test_acc {res['test_acc']:.4f} test_loss {res['test_loss']:.4f} "
                f"time {res['wall_time']:.1f}s backprops {res['backprops']:.0f} hvps {res['hvps']:.0f}")


def write_tuned_table(doc: Dict[str, Any], path: str, problem: str = "lenet5-mnist") -> None:
    """The selected settings of ``problem`` as the tuned table the README demo reads."""
    chosen = {r["optimizer"]: r["point"] for r in doc["tuning"] if r["problem"] == problem and r["selected"]}
    if not chosen:
        raise ValueError(f"--write-tuned: the run has no tuned settings for {problem}")
    p = doc["problems"][problem]
    setting = (f"{p['dataset']} {p.get('sizes', p['config']['subset'])} (train/val/test), {p['model']}, "
               f"{p['config']['epochs']} epochs of batch {p['config']['batch_size']}, tuning seed "
               f"{doc['settings']['tune_seed']}, {doc['settings']['grid_points']}-point grid over "
               f"{doc['settings']['span']} decades")
    tuning.write_tuned(path, problem, setting, chosen, doc.get("command") or "python python/compare.py")

