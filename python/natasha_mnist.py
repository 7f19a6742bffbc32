"""Natasha1.5 / Natasha2 vs SGD, SGD-momentum and Adam: LeNet on real MNIST (the comparison of
Liu, Liu, Liu & Li, "Implementing and evaluating Natasha2 with PyTorch", Columbia University
project report, undated, Sec. 4 / Fig. 3 and its appendix).

Report setting: LeNet, cross-entropy; every epoch draws 10 % of the training set by bootstrap;
30 epochs; SGD lr 0.01; SGD-momentum lr 0.01, momentum 0.9; Adam torch defaults; Natasha1.5
alpha = 0.01, B = 27, p = 9, sigma = 0.5. Every Natasha row uses the class defaults (the report's
Alg. 1 with those numbers) or the class's ``report_experiment`` preset, nothing else:

* ``natasha1.5-report``: ``Natasha15.REPORT_EXPERIMENT``, the report's Alg. 2 (the run behind its figure);
* ``natasha1.5-faithful``: ``Natasha15`` defaults (Alg. 1: variance reduction, mu from B = 27 minibatches);
* ``natasha2-report-exact`` / ``natasha2-report-fd``: ``Natasha2.REPORT_EXPERIMENT`` (Alg. 3 with
  double-backward HVPs / Alg. 4 with the finite difference q = 1e-4; kick test on Oja's minibatch);
* ``natasha2-faithful``: ``Natasha2`` defaults (Alg. 1: F^k prox, mu from B minibatches, kick test
  on a fresh minibatch).

The report states no delta and eta for Natasha2; every Natasha2 row runs the class's delta 0.1
(100 Oja iterations) and eta 0.1. The batch size is not stated in the report; 100 here.

    python python/natasha_mnist.py                 # short run: 12k images, 4 epochs (minutes on CPU)
    python python/natasha_mnist.py --full          # the report's setting: all 60k images, 30 epochs
    python python/natasha_mnist.py --epochs 10 --subset 20000/2000/2000 --seeds 0,1

Writes <out>/history.csv (one row per optimizer, seed, epoch), summary.csv, summary.txt (the
final-loss table), summary.md (setting + the table in markdown) and curves.png (loss curves).
The short run's outputs are kept in reports/natasha_mnist/ (``--out reports/natasha_mnist``).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

from natasha_ext import data, models, training
from natasha_ext.optim import Natasha2, Natasha15
from natasha_ext.training import TrainConfig
from natasha_ext.training.kicks import KickProbe

# (label, CLI optimizer name, hyperparameter overrides); the Natasha rows: class defaults or presets
CONFIGS = [
    ("sgd", "sgd", dict(lr=0.01)),
    ("sgd-momentum", "sgd-momentum", dict(lr=0.01, momentum=0.9)),
    ("adam", "adam", dict(lr=0.001)),
    ("natasha1.5-report", "natasha15", dict(Natasha15.REPORT_EXPERIMENT)),
    ("natasha1.5-faithful", "natasha15", dict()),
    ("natasha2-report-exact", "natasha2", dict(Natasha2.REPORT_EXPERIMENT, hvp="exact")),
    ("natasha2-report-fd", "natasha2", dict(Natasha2.REPORT_EXPERIMENT)),
    ("natasha2-faithful", "natasha2", dict()),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the report's setting: all training images, 30 epochs")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (short) / 30 (--full)")
    ap.add_argument("--subset", default=None, help="TRAIN/VAL/TEST (default 12000/1000/1000 short, all/5000/all full)")
    ap.add_argument("--bootstrap", type=float, default=None,
                    help="fraction of the training set drawn per epoch (default 0.5 short / 0.1 full: ~60 "
                         "minibatches per epoch either way, as in the report)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", default=None, help="comma list of labels to run (default: all)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/natasha_mnist")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    epochs = a.epochs if a.epochs is not None else (30 if a.full else 4)
    subset = a.subset or ("full" if a.full else "12000/1000/1000")
    a.bootstrap = a.bootstrap if a.bootstrap is not None else (0.1 if a.full else 0.5)
    args = TrainConfig(model="lenet5", dataset="mnist", subset=subset, epochs=epochs, batch_size=a.batch_size,
                       bootstrap=a.bootstrap, seeds=a.seeds, device=a.device, out=a.out, progress=a.progress)
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = [c for c in CONFIGS if a.only is None or c[0] in a.only.split(",")]
    splits = data.load_splits("mnist", subset, seed=0).to(a.device)
    sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
    print(f"MNIST {sizes} (train/val/test), LeNet-5, {epochs} epochs, bootstrap {a.bootstrap}, batch {a.batch_size}, "
          f"seeds {args.seeds}, {torch.get_num_threads()} threads")
    rows, notes, t0 = [], [], time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = copy.deepcopy(models.get_model("lenet5").state_dict())
        for label, name, hp in configs:
            model = models.get_model("lenet5")
            model.load_state_dict(init)
            model.to(a.device)
            probe = KickProbe(100) if name == "natasha2" else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                hist = training.train_one(args.for_optimizer(name, **hp), name, model, splits, seed,
                                          log=lambda s: print(s, flush=True), observer=probe)
            for w in caught:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            if probe is not None:
                notes.append(natasha2_note(label, seed, probe, caught))
            for r in hist:
                r["optimizer"] = label
            rows.extend(hist)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = training.summarize(rows)
    table = training.format_table(summary)
    training.write_csv(out / "history.csv", rows, training.HISTORY_COLUMNS)
    (out / "summary.txt").write_text(table + "\n")
    cols = list(summary[0].keys()) if summary else []
    training.write_csv(out / "summary.csv", summary, cols)
    training.plot_curves(rows, out / "curves.png", f"LeNet-5 / MNIST {sizes}, {epochs} epochs, bootstrap {a.bootstrap}")
    wall = time.time() - t0
    setting = (f"MNIST {sizes} (train/val/test), LeNet-5, {epochs} epochs, bootstrap {a.bootstrap} of the training "
               f"set per epoch, batch {a.batch_size}, seeds {','.join(map(str, args.seeds))}, device {a.device}, "
               f"{torch.get_num_threads()} threads")
    (out / "summary.md").write_text(markdown_summary(table, setting, configs, wall, argv, notes))
    print("\n" + table)
    print(f"\n{len(configs)} optimizers x {len(args.seeds)} seed(s) in {wall:.0f} s; results in {out}/")
    return 0


def natasha2_note(label: str, seed: int, probe: KickProbe, caught) -> str:
    """One line on a Natasha2 run: decided outer iterations, kicks, the kick-test quotients, and
    whether Oja's eta * lambda_max <= 1 was seen broken."""
    c = probe.counters
    rq = [r for r in probe.rayleighs if r == r]
    eta = any("eta * lambda_max" in str(w.message) for w in caught)
    return (f"- `{label}` seed {seed}: {int(c.get('oja_runs', 0))} outer iterations decided, "
            f"{int(c.get('kicks', 0))} kick(s), kick-test v'Hv "
            + (f"min {min(rq):.3g} / max {max(rq):.3g}" if rq else "none")
            + ("; an Oja iterate had u'Hu > 1/eta (eta * lambda_max > 1, warned)" if eta else "; eta check passed"))


def markdown_summary(table: str, setting: str, configs, wall: float, argv, notes=()) -> str:
    """summary.md: the setting, the hyperparameters and the final-metrics table as markdown."""
    lines = table.splitlines()
    cells = lambda ln: [c.strip() for c in ln.split(" | ")]
    header = cells(lines[0])
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    md += ["| " + " | ".join(cells(ln)) + " |" for ln in lines[2:]]
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python python/natasha_mnist.py" + ("" if not argv else " " + " ".join(argv))
    hps = [f"- `{label}`: {name}" + "".join(f", {k}={v}" for k, v in hp.items()) for label, name, hp in configs]
    return "\n".join([
        "# Natasha1.5 / Natasha2 vs SGD, SGD-momentum, Adam: LeNet-5 on MNIST", "",
        f"Command: `{cmd}`  ", f"Setting: {setting}.  ", f"Total wall time: {wall:.0f} s.", "",
        "Final epoch (train loss/accuracy on the whole training subset, test on the test subset; "
        "backprops = gradient evaluations incl. finite-difference HVPs, HVPs = Hessian-vector products):", "",
        *md, "", "Train times are wall-clock seconds on the machine that ran it (noisy when that machine is "
        "shared); backprops and HVPs count the work. Natasha2's report rows without a kick are exactly "
        "Natasha1.5's Alg. 2 (the Oja phase reuses the gradient of its minibatch).", "",
        *(["Natasha2 runs:", "", *notes, ""] if notes else []),
        "Hyperparameters (besides these, the class defaults):", "", *hps, "",
        "Files: `history.csv` (one row per optimizer, seed, epoch), `summary.csv`, `curves.png`.", ""])


if __name__ == "__main__":
    sys.exit(main())
