"""Table I / Table II and Figures 1-2 of "Discussion on the viability of a modern second order
method ..." (Attias, Cadei & Novakovic, EPFL, undated).

Setting (the paper's): ResNet-18 with a 1-channel stem (11,175,370 parameters), real MNIST,
class-balanced 1200 train / 200 validation / 200 test images, batch 100, 15 epochs,
cross-entropy without regularisation, the same initial weights for every optimizer (per seed),
the paper's grid-searched hyperparameters:

    SGD           lr 0.01
    SGD-momentum  lr 0.005, momentum 0.9
    Adam          lr 0.001, betas (0.9, 0.999)
    AdaHessian    lr 0.1,   betas (0.9, 0.999)             (Hessian power 1, eps 1e-4)
    Hybrid        SGD-momentum (lr 0.005, 0.9) until the validation loss < tl = 1.0,
                  then AdaHessian (lr 0.001, betas (0.9, 0.999))

Everything else is the classes' defaults (the papers' forms): D^(s) is eq. 9's mean of the signed
D (--abs-before-average: mean |D|, what the authors' torch_optimizer code computed), the Hybrid's
SGD phase is torch.optim.SGD's buf = mu buf + g, the form the authors ran (--sgd-momentum-form
paper: eq. 2's mu m + (1 - mu) g).

    python python/adahessian_table1.py                       # the paper's setting, seed 0
    python python/adahessian_table1.py --seeds 0-9           # the paper's 10 runs
    python python/adahessian_table1.py --epochs 3 --only adahessian,hybrid --hvp finite_difference
    python python/adahessian_table1.py --epochs 1 --only hybrid --sgd-momentum-form paper

Prints train/validation/test accuracy (Table I) and training time (Table II) as mean ± std over
the seeds beside the paper's numbers, and writes to --out: history.csv (one row per optimizer,
seed, epoch), summary.csv, results.json, summary.md (the tables in markdown, ours vs paper),
figures.png (Figures 1-2: validation loss and accuracy by epoch, mean ± std band) and curves.png
(the training program's six panels). Training time counts the optimizer steps only, not the
per-epoch evaluation. The training loop is natasha_ext.train's (the CLI's).
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from natasha_ext import data, models, training
from natasha_ext.optim import HybridSGDAdaHessian
from natasha_ext.training import TrainConfig

# (label, CLI optimizer name, the paper's hyperparameters)
CONFIGS = [
    ("SGD", "sgd", dict(lr=0.01)),
    ("SGD-momentum", "sgd-momentum", dict(lr=0.005, momentum=0.9)),
    ("Adam", "adam", dict(lr=0.001, beta1=0.9, beta2=0.999)),
    ("AdaHessian", "adahessian", dict(lr=0.1, beta1=0.9, beta2=0.999)),
    ("Hybrid", "hybrid", dict(switch_threshold=1.0, sgd_lr=0.005, momentum=0.9, lr=0.001, beta1=0.9, beta2=0.999)),
]

# Table I (accuracy %, mean ± std over 10 runs) and Table II (training time s, K80 GPU)
PAPER = {
    "SGD": dict(train=(100, 0), val=(87.55, 1.17), test=(87.45, 1.42), time=(14.57, 0.60)),
    "SGD-momentum": dict(train=(100, 0), val=(94.5, 1.03), test=(93.5, 1.35), time=(13.79, 1.78)),
    "Adam": dict(train=(99.95, 0.11), val=(93.85, 1.53), test=(93.35, 3.51), time=(11.30, 1.63)),
    "AdaHessian": dict(train=(100, 0), val=(93.625, 2.01), test=(93, 2.28), time=(14.26, 3.27)),
    "Hybrid": dict(train=(100, 0), val=(94.1, 1.33), test=(94.2, 0.79), time=(17.43, 0.85)),
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="'0', '0,1,2' or '0-9' (the paper averaged 10 runs)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--subset", default="1200/200/200", help="TRAIN/VAL/TEST sizes, class-balanced")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the subset draw (one split for all runs)")
    ap.add_argument("--only", default=None, help="comma list of labels or CLI names (default: all five)")
    ap.add_argument("--hvp", choices=("exact", "finite_difference"), default="exact",
                    help="AdaHessian/Hybrid Hessian-vector products (the paper: exact, double backward)")
    ap.add_argument("--update-each", type=int, default=1, help="AdaHessian/Hybrid: steps between Hessian refreshes")
    ap.add_argument("--abs-before-average", action="store_true",
                    help="AdaHessian/Hybrid: D^(s) = mean |D| (the authors' code) instead of eq. 9's mean D")
    ap.add_argument("--sgd-momentum-form", choices=("torch", "paper"), default=None,
                    help="Hybrid's SGD phase (default: the class's, torch = the form behind Table I)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/adahessian_table1")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    return ap.parse_args(argv)


def _class_default(arg: str):
    return inspect.signature(HybridSGDAdaHessian).parameters[arg].default


def selected(only):
    if not only:
        return list(CONFIGS)
    want = {w.strip().lower() for w in only.split(",") if w.strip()}
    out = [c for c in CONFIGS if c[0].lower() in want or c[1] in want]
    if not out:
        raise SystemExit(f"--only matched nothing; labels: {[c[0] for c in CONFIGS]}")
    return out


def run(a: argparse.Namespace) -> dict:
    configs = selected(a.only)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    args = TrainConfig(model="resnet18", dataset="mnist", subset=a.subset, data_seed=a.data_seed, epochs=a.epochs,
                       batch_size=a.batch_size, seeds=a.seeds, device=a.device, out=a.out, progress=a.progress)
    if a.threads:
        torch.set_num_threads(a.threads)
    splits = data.load_splits("mnist", a.subset, seed=a.data_seed).to(a.device)
    sizes = "/".join(str(getattr(splits, k)[0].shape[0]) for k in ("train", "val", "test"))
    build = lambda: models.get_model("resnet18", in_channels=1, image_size=28, num_classes=10)
    setting = (f"MNIST {sizes} (train/val/test, class-balanced, data seed {a.data_seed}), ResNet-18 1-channel stem "
               f"({models.num_parameters(build()):,} parameters), batch {a.batch_size}, {a.epochs} epochs, "
               f"seeds {','.join(map(str, args.seeds))}, AdaHessian HVP {a.hvp}, update_each {a.update_each}, "
               f"D^(s) {'mean |D|' if a.abs_before_average else 'mean D (eq. 9)'}, "
               f"Hybrid SGD momentum form {a.sgd_momentum_form or _class_default('sgd_momentum_form')}, "
               f"device {a.device}, {torch.get_num_threads()} threads")
    print(setting, flush=True)
    log = lambda s: print(s, flush=True)
    rows, t0 = [], time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        init = copy.deepcopy(build().state_dict())  # same initial weights for every optimizer
        for label, name, hp in configs:
            hp = dict(hp)
            if name in ("adahessian", "hybrid"):
                hp.update(hvp=a.hvp, update_each=a.update_each)
                if a.abs_before_average:
                    hp.update(abs_before_average=True)
            if name == "hybrid" and a.sgd_momentum_form is not None:
                hp.update(sgd_momentum_form=a.sgd_momentum_form)
            model = build()
            model.load_state_dict(init)
            model.to(a.device)
            hist = training.train_one(args.for_optimizer(name, **hp), name, model, splits, seed, log=log)
            for r in hist:
                r["optimizer"] = label
            rows.extend(hist)
    wall = time.time() - t0
    return dict(rows=rows, configs=configs, setting=setting, wall=wall, args=args)


def switch_epochs(rows):
    """Hybrid: the epoch after which AdaHessian took over (its HVPs start the epoch after)."""
    out = {}
    for r in sorted((r for r in rows if r["optimizer"] == "Hybrid"), key=lambda r: (r["seed"], r["epoch"])):
        if r["hvps"] > 0 and r["seed"] not in out:
            out[r["seed"]] = r["epoch"] - 1
    return out


def _pm(mu, sd, n, fmt="{:.2f}"):
    if mu is None or math.isnan(mu):
        return "-"
    return fmt.format(mu) if n < 2 else f"{fmt.format(mu)} ± {fmt.format(sd)}"


def tables(summary, rows):
    """(Table I rows, Table II rows) as lists of cells: ours beside the paper's."""
    t1, t2 = [], []
    switches = switch_epochs(rows)
    for s in summary:
        label, n, p = s["optimizer"], s["seeds"], PAPER[s["optimizer"]]
        paper = lambda k: f"{p[k][0]:g} ± {p[k][1]:g}"
        acc = lambda m: _pm(100 * s[m + "_mean"], 100 * s[m + "_std"], n)
        t1.append([label, str(n), acc("train_acc"), paper("train"), acc("val_acc"), paper("val"), acc("test_acc"),
                   paper("test")])
        extra = ""
        if label == "Hybrid":
            sw = [switches.get(seed) for seed in sorted({r["seed"] for r in rows if r["optimizer"] == "Hybrid"})]
            extra = "switch after epoch " + ",".join("never" if e is None else str(e) for e in sw)
        t2.append([label, str(n), _pm(s["wall_time_mean"], s["wall_time_std"], n), paper("time"),
                   f"{s['backprops_mean']:.0f}", f"{s['hvps_mean']:.0f}", extra])
    return t1, t2


T1_HEAD = ["optimizer", "seeds", "train %", "paper", "validation %", "paper", "test %", "paper"]
T2_HEAD = ["optimizer", "seeds", "training time s", "paper (K80 GPU)", "gradients", "HVPs", ""]


def text_table(head, body):
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(head)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in body])


def md_table(head, body):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in body])


def plot_figures(rows, path, title):
    """Figures 1-2: validation loss and validation accuracy by epoch (mean ± std over seeds)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, ylabel, scale in ((axes[0], "val_loss", "validation loss", 1.0),
                                      (axes[1], "val_acc", "validation accuracy %", 100.0)):
        for label in dict.fromkeys(r["optimizer"] for r in rows):
            rs = [r for r in rows if r["optimizer"] == label and math.isfinite(r[metric])]
            epochs = sorted({r["epoch"] for r in rs})
            mus, sds = [], []
            for e in epochs:
                vals = [scale * r[metric] for r in rs if r["epoch"] == e]
                mus.append(statistics.fmean(vals))
                sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            (ln,) = ax.plot(epochs, mus, marker="o", markersize=3, label=label)
            if any(sds):
                ax.fill_between(epochs, [m - s for m, s in zip(mus, sds)], [m + s for m, s in zip(mus, sds)],
                                color=ln.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_title("Figure 1: validation loss")
    axes[1].set_title("Figure 2: validation accuracy")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(res, a, argv) -> str:
    rows, out = res["rows"], Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = training.summarize(rows)
    t1, t2 = tables(summary, rows)
    training.write_csv(out / "history.csv", rows, training.HISTORY_COLUMNS)
    training.write_csv(out / "summary.csv", summary, list(summary[0].keys()))
    title = f"ResNet-18 / MNIST {a.subset}, {a.epochs} epochs, {len(res['args'].seeds)} seed(s)"
    plot_figures(rows, out / "figures.png", title)
    training.plot_curves(rows, out / "curves.png", title)
    argv = sys.argv[1:] if argv is None else argv
    cmd = "python python/adahessian_table1.py" + ("" if not argv else " " + " ".join(argv))
    hps = [f"- {label}: `{name}`, " + ", ".join(f"{k}={v}" for k, v in hp.items()) for label, name, hp in res["configs"]]
    md = "\n".join([
        "# AdaHessian / Hybrid paper, Table I and Table II (ResNet-18 on MNIST)", "",
        f"Command: `{cmd}`  ", f"Setting: {res['setting']}.  ",
        f"Total wall time: {res['wall']:.0f} s (training + per-epoch evaluation of all runs).", "",
        "Table I: accuracy after the last epoch (ours: mean ± std over seeds; paper: 10 runs, 15 epochs)", "",
        md_table(T1_HEAD, t1), "",
        "Table II: training time (optimizer steps only, no evaluation), gradient and Hessian-vector-product "
        "evaluations per run (ours on this device; the paper's on a K80 GPU)", "",
        md_table(T2_HEAD, t2), "", "Hyperparameters:", "", *hps, "",
        "Files: `history.csv` (one row per optimizer, seed, epoch), `summary.csv`, `results.json`, "
        "`figures.png` (Figures 1-2), `curves.png`.", ""])
    (out / "summary.md").write_text(md)
    doc = {"setting": res["setting"], "command": cmd, "wall_time_s": res["wall"], "paper": PAPER,
           "hyperparameters": {label: hp for label, _, hp in res["configs"]},
           "hybrid_switch_epoch": switch_epochs(rows), "summary": summary, "history": rows}
    training.write_json(out / "results.json", doc)
    text = "Table I (accuracy %)\n" + text_table(T1_HEAD, t1) + "\n\nTable II (training time)\n" + text_table(T2_HEAD, t2)
    return text


def main(argv=None) -> int:
    a = parse(argv)
    try:
        res = run(a)
    except data.DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = write(res, a, argv)
    print("\n" + text)
    print(f"\n{len(res['configs'])} optimizers x {len(res['args'].seeds)} seed(s) in {res['wall']:.0f} s; "
          f"results in {a.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
