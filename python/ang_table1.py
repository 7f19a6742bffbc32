"""Table 1 of the ANG paper (Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a
regularized natural gradient optimization algorithm with look-ahead strategy", 2021): time per
iteration and per epoch of K-FAC, SGD, ANG and IFANG with the gaps relative to K-FAC, plus the
accuracy/loss curves of SGD, K-FAC, ANG (each lambda strategy) and IFANG.

Timing (Table 1): ResNet-18 in its CIFAR form (natasha_ext.models.resnet18, 3x3 stride-1 stem, no
max-pool, 11.17 M parameters) on 32x32x3 input; the short default keeps its depth and layer structure
at a quarter of its width (``--width 16``, 0.70 M parameters, factors <= 1152 instead of 4608) so the
CPU run takes minutes (one K-FAC inverse refresh of the real ResNet-18 takes minutes on 2 shared
CPU cores; ``--width 64`` or ``--full``). CIFAR-10 is not available offline: the images are
real Fashion-MNIST digits (MNIST with ``--dataset mnist``) zero-padded from 28x28 to 32x32 and
repeated over 3 channels by natasha_ext.data. Every optimizer runs the same minibatches from the
same initial weights, taking turns iteration by iteration (so load changes on a shared machine hit
all alike); each iteration is timed on its own (device synchronised) and classified by
what the optimizer did in it:
  * inverse: K-FAC/ANG refreshed the damped factor inverses (and the factors) in this iteration;
  * factors: statistics/factor update only;   * plain: neither.
"Time per iteration" is the paper's: for K-FAC and ANG an iteration that refreshes the inverses,
for SGD and IFANG (no inverses) their median iteration. "Time per epoch" is the measured sum over
one epoch with ``--full`` (50000 images / batch 128 = 391 iterations, as CIFAR-10; K-FAC's usual
cov_every = 10, inv_every = 100); the short default run measures a few iterations of each class
and reports the epoch *projected* from the class medians with the same 391-iteration schedule
(n_inverse = 4, n_factors = 36, n_plain = 351): this is stated in the output.
The timed ANG refreshes on K-FAC's schedule (``--timing-schedule kfac``, the default here), not
on its class default (Algorithm 2: factors and inverses at every iteration): the paper's own
Table 1 can only come from a periodic refresh (ANG's epoch, 56.48 s, is K-FAC's 56.34 s + 0.24 %
over 391 iterations, of which one that inverts takes 4.86 s); ``--timing-schedule class`` times
every optimizer with its defaults.
``--tables-only`` re-renders table1.md / timing.json from the timing.csv and history.csv in --out.

Curves: natasha_ext.training.train_one (the training CLI's loop, tqdm bars) for SGD (momentum 0.9,
lr 0.01 as in the paper), K-FAC (the paper's lr 0.005, the CLI's other defaults), ANG with the
'linear', 'exp' and 'cosine' lambda strategies and IFANG, both with their class defaults, which
are the paper's Algorithm 2 (lr 0.005, plain step, the factors of every minibatch, rank 1), on a
class-balanced slice of the same padded data. Every method gets the paper's "milestone
step-down" of the learning rate (Sec. 3.1, milestones not stated): torch's MultiStepLR, lr x 0.1
at 50 % and 75 % of the run (``--milestones``, ``--milestone-gamma``; ``--milestones none``
turns it off). The short default uses LeNet-5 (32x32x3 input) and 1200 training images so it
finishes in minutes on a CPU; ``--full`` uses the ResNet-18 above.

    python python/ang_table1.py                       # short run (CPU, a few minutes)
    python python/ang_table1.py --full --device cuda  # the paper's setting (an epoch of 391 iterations)
    python python/ang_table1.py --skip-curves --timing-iters 12

Writes <out>/timing.csv, timing.json (per-iteration times and the table), history.csv (curves),
curves.png, table1.md (both tables beside the paper's numbers). The short run's outputs are kept
in reports/ang_table1/ (``--out reports/ang_table1``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext import data, models, training
from natasha_ext.training import TrainConfig

# Table 1 of the paper (TITAN RTX, ResNet on CIFAR): seconds, gap vs K-FAC
PAPER = {"K-FAC": (4.77, 56.34), "SGD": (0.0144, 32.72), "ANG": (4.855, 56.48), "IFANG": (0.341, 43.2)}
EPOCH_ITERS, COV_EVERY, INV_EVERY = 391, 10, 100    # CIFAR-10 epoch at batch 128; K-FAC's usual schedule

# (label, CLI optimizer name, hyperparameter overrides); lr as in the paper's Sec. 3.1 (ANG and
# IFANG's class defaults are the paper's, K-FAC's lr 0.005 is the paper's for K-FAC). The K-FAC
# baseline takes the factors ANG does, the empirical statistics of eqs. 9-10 (KFAC's class default
# is Martens & Grosse's sampled-target Fisher)
_KFAC_BASELINE = dict(lr=0.005, fisher="empirical")
TIMED = [("K-FAC", "kfac", _KFAC_BASELINE), ("SGD", "sgd-momentum", dict(lr=0.01, momentum=0.9)),
         ("ANG", "ang", dict(lam_schedule="linear")), ("IFANG", "ifang", dict())]
CURVES = [("SGD", "sgd-momentum", dict(lr=0.01, momentum=0.9)), ("K-FAC", "kfac", _KFAC_BASELINE),
          ("ANG-linear", "ang", dict(lam_schedule="linear")),
          ("ANG-exp", "ang", dict(lam_schedule="exp")),
          ("ANG-cosine", "ang", dict(lam_schedule="cosine")),
          ("IFANG", "ifang", dict())]


class MilestoneLR:
    """The paper's milestone step-down of the learning rate (Sec. 3.1) as a train_one observer:
    torch.optim.lr_scheduler.MultiStepLR, stepped after every optimizer step, lr x ``gamma`` at
    each of ``fractions`` of the run's ``total_steps``."""

    def __init__(self, total_steps: int, fractions, gamma: float):
        self.milestones = sorted({max(1, round(f * total_steps)) for f in fractions})
        self.gamma = gamma
        self.scheduler = None

    def before_step(self, optimizer):
        if self.scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.milestones, self.gamma)

    def after_step(self, optimizer, ctx, xb, yb, loss):
        self.scheduler.step()


def _fractions(text: str):
    if text.strip().lower() == "none":
        return ()
    values = tuple(float(v) for v in text.split(","))
    if not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"milestones are fractions of the run in (0, 1), got {text!r}")
    return values


class _Block(nn.Module):
    """ResNet basic block (two 3x3 convs, batch norm, identity or 1x1 projection shortcut)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.short(x))


def resnet18(width: int = 64) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool, stages of width w, 2w, 4w, 8w, 2 blocks each).
    width 64 is natasha_ext.models.resnet18(3, 10, stem='small') itself (11.17 M parameters, K-FAC
    factors up to 4608 x 4608); a smaller width keeps the depth and layer structure with every
    factor width/64 times smaller (the short CPU default, 16: 0.70 M parameters, factors <= 1152)."""
    if width == 64:
        return models.resnet18(3, 10, stem="small")
    w = width
    layers = [nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    cin = w
    for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
        layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _kind(opt, before):
    c = getattr(opt, "counters", None)
    if c is None:
        return "plain"
    if c.get("inverse_updates", 0) > before.get("inverse_updates", 0):
        return "inverse"
    if c.get("factor_updates", 0) > before.get("factor_updates", 0) and type(opt).__name__ != "IFANG":
        return "factors"
    return "plain"


def _step(opt, spec, model, x, y):
    if spec.closure == "loss":
        return opt.step(lambda: F.cross_entropy(model(x), y))

    def closure():
        opt.zero_grad(set_to_none=True)
        out = F.cross_entropy(model(x), y)
        out.backward()
        return out
    return opt.step(closure)


def _periodic(timing_schedule: str):
    return ("K-FAC", "ANG") if timing_schedule == "kfac" else ("K-FAC",)


def time_optimizers(runs, batches, device, progress):
    """Per-iteration wall times and kinds. ``runs``: (label, optimizer, spec, model). The
    optimizers take turns (iteration i of every optimizer, then i + 1 ...) so that a change in the
    machine's load during the run hits all of them alike."""
    from tqdm.auto import tqdm

    rows = []
    for i, (x, y) in enumerate(tqdm(batches, desc="timing", leave=False, disable=not progress)):
        for label, opt, spec, model in runs:
            before = dict(getattr(opt, "counters", {}))
            _sync(device)
            t0 = time.perf_counter()
            loss = _step(opt, spec, model, x, y)
            _sync(device)
            dt = time.perf_counter() - t0
            rows.append(dict(optimizer=label, iteration=i, seconds=dt, kind=_kind(opt, before),
                             loss=float(loss.detach())))
    return rows


def table1(rows, full: bool, periodic=("K-FAC", "ANG")):
    """The Table 1 rows: per-iteration (paper's definition) and per-epoch times with gaps vs K-FAC;
    ``periodic``: the optimizers timed on K-FAC's refresh schedule (the others' epoch is 391 times
    their median iteration)."""
    out = {}
    for label in [t[0] for t in TIMED]:
        rs = [r for r in rows if r["optimizer"] == label]
        if not rs:
            continue
        by = {k: [r["seconds"] for r in rs if r["kind"] == k] for k in ("inverse", "factors", "plain")}
        # medians: robust to the load spikes of a shared machine (one slow iteration of five)
        mean = {k: (statistics.median(v) if v else math.nan) for k, v in by.items()}
        allmean = statistics.median(r["seconds"] for r in rs)
        per_iter = mean["inverse"] if by["inverse"] else allmean
        if full:
            per_epoch, how = sum(r["seconds"] for r in rs), "measured"
        elif label in periodic:
            n_inv = math.ceil(EPOCH_ITERS / INV_EVERY)
            n_fac = math.ceil(EPOCH_ITERS / COV_EVERY) - n_inv
            plain = mean["plain"] if by["plain"] else allmean
            fac = mean["factors"] if by["factors"] else plain
            per_epoch = n_inv * mean["inverse"] + n_fac * fac + (EPOCH_ITERS - n_inv - n_fac) * plain
            how = "projected"
        else:
            per_epoch, how = EPOCH_ITERS * allmean, "projected"
        out[label] = dict(per_iteration=per_iter, per_epoch=per_epoch, epoch=how, iterations=len(rs),
                          mean_inverse=mean["inverse"], mean_factors=mean["factors"], mean_plain=mean["plain"],
                          mean_all=allmean)
    ref = out.get("K-FAC")
    for v in out.values():
        v["gap_iteration"] = 100.0 * (v["per_iteration"] / ref["per_iteration"] - 1) if ref else math.nan
        v["gap_epoch"] = 100.0 * (v["per_epoch"] / ref["per_epoch"] - 1) if ref else math.nan
    return out


def markdown(tab, setting, curve_setting, curve_table, wall, argv, full):
    def pct(x):
        return f"{x:+.2f} %" if math.isfinite(x) else "-"

    lines = ["# ANG paper, Table 1: time per iteration and per epoch (gaps relative to K-FAC)", "",
             f"Command: `python python/ang_table1.py{(' ' + ' '.join(argv)) if argv else ''}`  ",
             f"Setting: {setting}.  ", f"Total wall time of this run: {wall:.0f} s.", "",
             "| algorithm | s / iteration | gap | s / epoch | gap | paper s / iteration | paper gap | "
             "paper s / epoch | paper gap |", "|---|---|---|---|---|---|---|---|---|"]
    pk = PAPER["K-FAC"]
    for label, v in tab.items():
        p = PAPER[label]
        lines.append(f"| {label} | {v['per_iteration']:.4g} | {pct(v['gap_iteration'])} | {v['per_epoch']:.4g}"
                     f"{'' if full else ' *'} | {pct(v['gap_epoch'])} | {p[0]} | {pct(100 * (p[0] / pk[0] - 1))} | "
                     f"{p[1]} | {pct(100 * (p[1] / pk[1] - 1))} |")
    lines += ["", "Per-iteration class medians (s): " + "; ".join(
        f"{k}: inverse {v['mean_inverse']:.4g}, factors {v['mean_factors']:.4g}, plain {v['mean_plain']:.4g} "
        f"({v['iterations']} iterations)" for k, v in tab.items()), ""]
    if not full:
        lines += ["\\* projected epoch: 391 iterations (CIFAR-10 at batch 128) from the measured class medians, "
                  "K-FAC (and ANG unless timed with `--timing-schedule class`) with cov_every 10 / inv_every 100 "
                  "(4 inverse refreshes, 36 factor-only updates); "
                  "`--full` measures a real epoch.", ""]
    if curve_table:
        lines += ["## Curves (`curves.png`, `history.csv`)", "", f"Setting: {curve_setting}.", "", "```",
                  curve_table, "```", ""]
    lines += ["Files: `timing.csv` (every timed iteration and its kind), `timing.json`, `history.csv`, "
              "`curves.png`, this file.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the paper's setting (one measured 391-iteration epoch of "
                    "batch 128; ResNet-18 curves over 20 epochs of 10000 images)")
    ap.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist",
                    help="padded to 32x32x3 (MNIST is used when Fashion-MNIST is not installed)")
    ap.add_argument("--batch-size", type=int, default=None, help="timing batch (default 32 short, 128 full)")
    ap.add_argument("--timing-iters", type=int, default=None, help="timed iterations per optimizer "
                    "(default 5 short: inverse, plain, factors, plain, factors; 391 full)")
    ap.add_argument("--inverse", choices=("cholesky", "eigh"), default="cholesky", help="K-FAC/ANG damped inverse")
    ap.add_argument("--timing-schedule", choices=("kfac", "class"), default="kfac",
                    help="timed K-FAC/ANG refresh: kfac = K-FAC's periodic schedule for both (what the paper's "
                         "Table 1 times imply); class = each optimizer's defaults (ANG: every iteration)")
    ap.add_argument("--milestones", type=_fractions, default=(0.5, 0.75),
                    help="curves: lr step-downs at these fractions of the run (comma-separated; 'none': constant lr)")
    ap.add_argument("--milestone-gamma", type=float, default=0.1, help="curves: lr factor at each milestone")
    ap.add_argument("--width", type=int, default=None, help="ResNet-18 base width of the timing model (default 16 "
                    "short: the CPU run takes minutes; 64 = the real ResNet-18, the --full default)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-curves", action="store_true")
    ap.add_argument("--curves-model", default=None, help="default lenet5 (short) / resnet18 (full)")
    ap.add_argument("--curves-subset", default=None, help="TRAIN/VAL/TEST (default 1200/500/500; full 10000/1000/1000)")
    ap.add_argument("--curves-epochs", type=int, default=None, help="default 6 short / 20 full")
    ap.add_argument("--curves-batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/ang_table1")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--tables-only", action="store_true",
                    help="re-render table1.md/timing.json from <out>/timing.csv and history.csv (no training)")
    a = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dataset = a.dataset
    try:
        data.dataset_dir(dataset)
    except data.DatasetNotFoundError:
        print(f"{dataset} not installed; using mnist")
        dataset = "mnist"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.tables_only:
        return rerender(out, a.full)
    t_start = time.time()
    device = a.device
    batch = a.batch_size or (128 if a.full else 32)
    iters = a.timing_iters or (EPOCH_ITERS if a.full else 5)
    schedule = (COV_EVERY, INV_EVERY) if a.full else (2, INV_EVERY)   # short: every class shows up in 5 iterations
    timing_rows, tab, setting = [], {}, ""
    if not a.skip_timing:
        n_img = batch * iters
        xs, ys = data.load_tensors(dataset, "train", indices=torch.arange(n_img) % 60000, size=32, channels=3)
        batches = [(xs[i:i + batch].to(device), ys[i:i + batch].to(device)) for i in range(0, n_img, batch)]
        width = a.width or (64 if a.full else 16)
        torch.manual_seed(a.seed)
        init = copy.deepcopy(resnet18(width).state_dict())
        runs = []
        for label, name, hp in TIMED:
            model = resnet18(width)
            model.load_state_dict(init)
            model.to(device).train()
            F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()   # warm-up (allocator, threads)
            model.zero_grad(set_to_none=True)
            extra = dict(hp)
            if name in ("kfac", "ang") and (name == "kfac" or a.timing_schedule == "kfac"):
                extra.update(inverse=a.inverse, cov_every=schedule[0], inv_every=schedule[1])
            if name == "ang":
                extra.update(total_steps=EPOCH_ITERS)
            opt, spec = training.make_optimizer(name, model, **extra)
            runs.append((label, opt, spec, model))
        timing_rows = time_optimizers(runs, batches, device, a.progress)
        for label, *_ in runs:
            print(f"{label:6s} " + " ".join(f"{r['kind'][0]}:{r['seconds']:.3f}" for r in timing_rows
                                            if r["optimizer"] == label), flush=True)
        tab = table1(timing_rows, a.full, _periodic(a.timing_schedule))
        dev_name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
        n_par = models.num_parameters(resnet18(width))
        setting = (f"ResNet-18 (CIFAR form, 3x3 stem) of base width {width} ({n_par / 1e6:.2f} M parameters"
                   f"{'' if width == 64 else '; the real ResNet-18 is width 64, `--width 64`'}), "
                   f"{dataset} images zero-padded to 32x32x3, "
                   f"batch {batch}, {iters} timed iterations per optimizer (cov_every {schedule[0]}, inv_every "
                   f"{schedule[1]} for K-FAC{'/ANG' if a.timing_schedule == 'kfac' else '; ANG every step'}, "
                   f"{a.inverse} inverses; IFANG rank 1 statistics every step), "
                   f"{device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}")
        training.write_csv(out / "timing.csv", timing_rows, ["optimizer", "iteration", "seconds", "kind", "loss"])
    curve_table, curve_setting, curve_rows = "", "", []
    if not a.skip_curves:
        model_name = a.curves_model or ("resnet18" if a.full else "lenet5")
        subset = a.curves_subset or ("10000/1000/1000" if a.full else "1200/500/500")
        epochs = a.curves_epochs or (20 if a.full else 6)
        args = TrainConfig(model=model_name, model_args={"stem": "small"} if model_name == "resnet18" else {},
                           dataset=dataset, subset=subset, image_size=32, channels=3, epochs=epochs,
                           batch_size=a.curves_batch_size, device=device, out=str(out), progress=a.progress)
        splits = data.load_splits(dataset, subset, seed=0, size=32, channels=3).to(device)
        build = args.build_model
        torch.manual_seed(a.seed)
        init = copy.deepcopy(build().state_dict())
        n_steps = epochs * data.num_batches(splits.train[0].shape[0], a.curves_batch_size, args.bootstrap)
        used = {}
        for label, name, hp in CURVES:
            hp = dict(hp)
            if name == "kfac":  # short run: inverses refreshed often enough to matter in 72 steps
                hp["cov_every"], hp["inv_every"] = (COV_EVERY, INV_EVERY) if a.full else (1, 10)
            model = build()
            model.load_state_dict(init)
            model.to(device)
            cfg = args.for_optimizer(name, **hp)
            used[label] = cfg.hyperparameters(name)
            observer = MilestoneLR(n_steps, a.milestones, a.milestone_gamma) if a.milestones else None
            hist = training.train_one(cfg, name, model, splits, a.seed, log=lambda s: print(s, flush=True),
                                      observer=observer)
            for r in hist:
                r["optimizer"] = label
            curve_rows.extend(hist)
        sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
        training.write_csv(out / "history.csv", curve_rows, training.HISTORY_COLUMNS)
        training.plot_curves(curve_rows, out / "curves.png",
                          f"{model_name} / {dataset} padded to 32x32x3 ({sizes}), {epochs} epochs, seed {a.seed}")
        curve_table = training.format_table(training.summarize(curve_rows))
        steps_down = (f"lr x {a.milestone_gamma} at steps {MilestoneLR(n_steps, a.milestones, 0).milestones} of "
                      f"{n_steps} (MultiStepLR, every method)" if a.milestones else "constant lr")
        listed = "; ".join(f"{label}: " + ", ".join(f"{k} {v}" for k, v in hps.items() if v not in (None, 0, ""))
                           for label, hps in used.items())
        curve_setting = (f"{model_name} on {dataset} padded to 32x32x3, class-balanced {sizes} (train/val/test), "
                         f"{epochs} epochs of batch {a.curves_batch_size}, seed {a.seed}; {steps_down}; ANG/IFANG "
                         f"lambda from 0 to 1 over the run by the named strategy (IFANG: the default). "
                         f"Hyperparameters (0/None omitted): {listed}")
    wall = time.time() - t_start
    doc = {"setting": setting, "timing_schedule": a.timing_schedule, "table1": tab, "paper": PAPER, "iterations": timing_rows,
           "curves_setting": curve_setting, "curves_final": curve_table, "wall_seconds": wall, "argv": argv}
    (out / "timing.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(tab, setting, curve_setting, curve_table, wall, argv, a.full) if tab else ""
    if md:
        (out / "table1.md").write_text(md)
        print("\n" + md)
    print(f"results in {out}/ ({wall:.0f} s)")
    return 0


def rerender(out: Path, full: bool) -> int:
    """table1.md and timing.json again from a finished run's CSVs (the settings are read back from
    the old timing.json)."""
    import csv

    old = json.loads((out / "timing.json").read_text())
    with open(out / "timing.csv") as f:
        rows = [dict(r, iteration=int(r["iteration"]), seconds=float(r["seconds"]), loss=float(r["loss"]))
                for r in csv.DictReader(f)]
    curve_table = ""
    if (out / "history.csv").exists():
        num = lambda v: float(v) if v not in ("", None) else math.nan
        with open(out / "history.csv") as f:
            hist = [{k: (v if k == "optimizer" else num(v)) for k, v in r.items()} for r in csv.DictReader(f)]
        for r in hist:
            r["seed"], r["epoch"] = int(r["seed"]), int(r["epoch"])
        curve_table = training.format_table(training.summarize(hist))
    tab = table1(rows, full, _periodic(old.get("timing_schedule", "kfac")))
    old.update(table1=tab, curves_final=curve_table)
    (out / "timing.json").write_text(json.dumps(old, indent=1, default=str) + "\n")
    md = markdown(tab, old["setting"], old["curves_setting"], curve_table, old["wall_seconds"], old["argv"], full)
    (out / "table1.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
