"""The report of a tuned comparison (:mod:`.compare`): summary.md with the tuning and final
tables, the Natasha section, and one tuning-curve PNG per problem."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Sequence

from natasha_ext.training.summary import mean_std

__all__ = ["write_report", "markdown", "plot_tuning", "loss_at_budget", "NATASHA_BASELINES"]

NATASHA_BASELINES = ("sgd", "sgd-momentum", "natasha15", "natasha2")


def _pm(values: Sequence[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    mu, sd = mean_std([v for v in values if v is not None])
    if math.isnan(mu):
        return "-"
    return fmt.format(mu * scale) + ("" if len(values) < 2 else " ± " + fmt.format(sd * scale))


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def loss_at_budget(history: Sequence[Dict[str, Any]], budget: float, metric: str = "train_loss") -> float:
    """``metric`` of one run at ``budget`` gradient evaluations (backprops), linearly interpolated
    between the epoch ends around it; NaN beyond the run's last epoch or on a non-finite value."""
    pts = sorted((r["backprops"], r[metric]) for r in history)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= budget <= x1:
            if y0 is None or y1 is None:
                return math.nan
            return y0 if x1 == x0 else y0 + (y1 - y0) * (budget - x0) / (x1 - x0)
    return pts[0][1] if pts and pts[0][0] == budget else math.nan


def _fmt_value(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def markdown(doc: Dict[str, Any]) -> str:
    s = doc["settings"]
    lines = ["# Tuned comparison of the registered optimizers (DeepOBS protocol)", "",
             f"Command: `{doc.get('command') or 'python python/compare.py'}`  ",
             f"Status: {doc['status']}; {doc['threads']} torch thread(s) on {doc['machine']}, torch {doc['torch']}, "
             f"{doc['created']}.  ",
             f"Protocol: each optimizer's learning-rate-like flag (lr; the initial radius for trust-region, the "
             f"initial sigma for arc; sgd_lr with lr scaled alike for hybrid) on a {s['grid_points']}-point log grid "
             f"over {s['span']} decades centred on its CLI default, tuned with seed {s['tune_seed']} on the "
             f"validation split; the selected setting then trains with fresh seeds {s['seeds']} (same initial "
             f"weights and minibatch order for every optimizer of a seed).  ",
             f"Selection: {doc['selection']}.  ",
             f"Total: {doc.get('wall_seconds', math.nan):.0f} s wall clock, {doc.get('cpu_seconds', math.nan):.0f} s "
             "of process CPU time (with one thread: about the wall time on a quiet machine; "
             "`run_cpu_time` per run in tuning.csv / final.csv).", ""]
    for problem, p in doc["problems"].items():
        tune = [r for r in doc["tuning"] if r["problem"] == problem]
        final = [r for r in doc["final"] if r["problem"] == problem]
        if not tune:
            continue
        c = p["config"]
        lines += [f"## {problem}", "",
                  f"{c['dataset']} {p.get('sizes', c['subset'])} (train/val/test), {c['model']}, {c['epochs']} epochs "
                  f"of batch {c['batch_size']}; target: validation accuracy {p['target']:.3f}.", "",
                  "Tuning (seed %d; validation accuracy %% per grid point, x = diverged, * = selected):" % s["tune_seed"],
                  ""]
        rows = []
        for name in dict.fromkeys(r["optimizer"] for r in tune):
            rs = [r for r in tune if r["optimizer"] == name]
            cells = [f"{_fmt_value(r['value'])}: " + ("x" if r["diverged"] else f"{100 * r['val_acc']:.1f}")
                     + ("*" if r.get("selected") else "") for r in rs]
            sel = [i for i, r in enumerate(rs) if r.get("selected")]
            edge = len(rs) > 2 and sel and sel[0] in (0, len(rs) - 1) and not rs[sel[0]]["diverged"]
            rows.append([name, rs[0]["flag"], ", ".join(cells), "yes" if edge else ""])
        lines += _table(["optimizer", "tuned flag", "grid value: val acc %", "at grid edge"], rows) + [""]
        if any(r[3] for r in rows):
            lines += ["A selection at the grid's edge means the best value may lie outside the grid (widen "
                      "`--span`).", ""]
        if final:
            rows = []
            for name in dict.fromkeys(r["optimizer"] for r in final):
                rs = [r for r in final if r["optimizer"] == name]
                reached = [r for r in rs if r["epochs_to_target"] is not None and not math.isnan(r["epochs_to_target"])]
                col = lambda k: [r[k] for r in reached]
                to_t = (f"{len(reached)}/{len(rs)}: " + " / ".join([_pm(col("epochs_to_target"), fmt="{:.1f}"),
                                                                   _pm(col("backprops_to_target"), fmt="{:.0f}"),
                                                                   _pm(col("hvps_to_target"), fmt="{:.0f}"),
                                                                   _pm(col("time_to_target"), fmt="{:.1f}")])
                        if reached else f"0/{len(rs)}")
                div = sum(bool(r["diverged"]) for r in rs)
                rows.append([name + (f" ({div} diverged)" if div else ""), f"{rs[0]['flag']}={_fmt_value(rs[0]['value'])}",
                             str(len(rs)), _pm([r["test_acc"] for r in rs], 100), _pm([r["test_loss"] for r in rs], 1, "{:.4f}"),
                             _pm([r["wall_time"] for r in rs], 1, "{:.1f}"), _pm([r["backprops"] for r in rs], 1, "{:.0f}"),
                             _pm([r["hvps"] for r in rs], 1, "{:.0f}"), to_t])
            lines += ["Final runs (mean ± std over seeds; time = training seconds, backprops = gradient evaluations "
                      "incl. finite-difference HVPs; to target = reached/runs: epochs / backprops / HVPs / seconds):", ""]
            lines += _table(["optimizer", "setting", "seeds", "test acc %", "test loss", "time s", "backprops", "HVPs",
                             "to target"], rows) + [""]
        if p.get("png"):
            lines += [f"![tuning curves of {problem}]({Path(p['png']).name})", ""]
    lines += natasha_section(doc)
    lines += ["Files: `history.csv` (every epoch of every run), `tuning.csv`, `final.csv`, `kicks.csv`, "
              "`results.json`, `tuning-<problem>.png`.", ""]
    return "\n".join(lines)


def natasha_section(doc: Dict[str, Any]) -> List[str]:
    """Natasha1.5 / Natasha2 at an equal gradient budget against SGD and SGD-momentum, and
    Natasha2's kicks (count, v^T H v against the threshold, loss before/after each kick)."""
    lines = ["## Natasha1.5 and Natasha2, characterised", ""]
    found = False
    for problem in doc["problems"]:
        hist = [r for r in doc.get("final_history", []) if r["problem"] == problem]
        names = [n for n in NATASHA_BASELINES if any(r["optimizer"] == n for r in hist)]
        if not any(n.startswith("natasha") for n in names):
            continue
        found = True
        runs = {(n, seed): [r for r in hist if r["optimizer"] == n and r["seed"] == seed]
                for n in names for seed in sorted({r["seed"] for r in hist if r["optimizer"] == n})}
        finals = {}
        for (n, _), rs in runs.items():
            finals.setdefault(n, []).append(max(r["backprops"] for r in rs))
        budget = min(statistics.fmean(v) for v in finals.values())
        rows = []
        for n in names:
            per_seed = [rs for (m, _), rs in runs.items() if m == n]
            sel = next((r for r in doc["final"] if r["problem"] == problem and r["optimizer"] == n), None)
            rows.append([n, f"{sel['flag']}={_fmt_value(sel['value'])}" if sel else "-",
                         _pm([loss_at_budget(rs, budget) for rs in per_seed], 1, "{:.4f}"),
                         _pm([loss_at_budget(rs, budget, "val_acc") for rs in per_seed], 100)])
        lines += [f"### {problem}", "", f"At an equal budget of {budget:.0f} gradient evaluations (the smallest "
                  "mean final count of these four; values interpolated linearly between epoch ends; mean ± std "
                  "over the final seeds):", ""]
        lines += _table(["optimizer", "tuned setting", "train loss", "val acc %"], rows) + [""]
        lines += _kick_lines(doc, problem)
    if not found:
        lines += ["(No Natasha optimizer in this run.)", ""]
    return lines


def _kick_lines(doc: Dict[str, Any], problem: str) -> List[str]:
    oja = [o for o in doc.get("oja", []) if o["problem"] == problem]
    if not oja:
        return []
    kicks = [k for k in doc.get("kicks", []) if k["problem"] == problem]
    rq = [o["rayleigh"] for o in oja if o["rayleigh"] is not None and math.isfinite(o["rayleigh"])]
    seeds = sorted({o["seed"] for o in oja})
    out = [f"Natasha2 ({len(seeds)} final run(s)): {len(oja)} Oja runs, {len(kicks)} kick(s). Kick test v^T H v <= "
           f"{oja[0]['threshold']:.3g}; observed v^T H v: min {min(rq):.4g}, median {statistics.median(rq):.4g}, "
           f"max {max(rq):.4g}." if rq else f"Natasha2: {len(oja)} Oja runs, none finite.", ""]
    if kicks:
        better = sum(k["probe_loss_after"] < k["probe_loss_before"] for k in kicks)
        out += [f"Loss around the kicks (mean): minibatch {statistics.fmean(k['batch_loss_before'] for k in kicks):.4f} "
                f"-> {statistics.fmean(k['batch_loss_after'] for k in kicks):.4f}; probe set (first training "
                f"images) {statistics.fmean(k['probe_loss_before'] for k in kicks):.4f} -> "
                f"{statistics.fmean(k['probe_loss_after'] for k in kicks):.4f}; {better} of {len(kicks)} kicks lowered "
                "the probe loss (every kick is listed in kicks.csv).", ""]
    else:
        out += ["No kick happened: every Natasha2 outer iteration ran a Natasha1.5 epoch, so Natasha2 differed from "
                "Natasha1.5 only by the Oja phase's cost (its HVPs) and the gradient it reuses.", ""]
    return out


def plot_tuning(doc: Dict[str, Any], problem: str, path) -> None:
    """Validation accuracy and loss against the tuned value, one line per optimizer (log x);
    diverged grid points are drawn as x at the bottom of the accuracy panel."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tune = [r for r in doc["tuning"] if r["problem"] == problem]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 5))
    # twelve optimizers outrun a 10-colour cycle: a 20-colour map and alternating markers keep
    # every curve distinguishable
    colours, markers = plt.get_cmap("tab20").colors, "osD^v<>p"
    for k, name in enumerate(dict.fromkeys(r["optimizer"] for r in tune)):
        rs = [r for r in tune if r["optimizer"] == name]
        ok = [r for r in rs if not r["diverged"]]
        label = f"{name} ({rs[0]['flag']})"
        style = dict(marker=markers[k % len(markers)], color=colours[(2 * k) % 20 + (k // 10) % 2])
        (ln,) = ax_acc.plot([r["value"] for r in ok], [r["val_acc"] for r in ok], label=label, **style)
        ax_loss.plot([r["value"] for r in ok], [r["val_loss"] for r in ok], **style)
        bad = [r["value"] for r in rs if r["diverged"]]
        if bad:
            ax_acc.plot(bad, [0.0] * len(bad), "x", color=ln.get_color(), markersize=8)
        sel = [r for r in ok if r.get("selected")]
        if sel:
            ax_acc.plot([sel[0]["value"]], [sel[0]["val_acc"]], "*", color=ln.get_color(), markersize=14)
    for ax, ylabel in ((ax_acc, "validation accuracy (x: diverged, *: selected)"), (ax_loss, "validation loss")):
        ax.set_xscale("log")
        ax.set_xlabel("tuned value (lr; radius / sigma for trust-region / arc; sgd_lr for hybrid)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_loss.set_yscale("log")
    ax_acc.legend(fontsize=7, ncol=2)
    c = doc["problems"][problem]["config"]
    fig.suptitle(f"{problem}: {c['dataset']} {doc['problems'][problem].get('sizes', c['subset'])}, {c['model']}, "
                 f"{c['epochs']} epochs, seed {doc['settings']['tune_seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(doc: Dict[str, Any], out: Path, plot: bool = True) -> Dict[str, str]:
    """Write the PNGs (when ``plot``) and summary.md; returns the paths written."""
    from natasha_ext.training.outputs import atomic_write

    files: Dict[str, str] = {}
    for problem in doc["problems"]:
        if plot and any(r["problem"] == problem for r in doc["tuning"]):
            path = out / f"tuning-{problem}.png"
            plot_tuning(doc, problem, path)
            doc["problems"][problem]["png"] = files[f"png_{problem}"] = str(path)
    text = markdown(doc)
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    files["summary"] = str(out / "summary.md")
    return files
