"""Per-optimizer summaries of a run's history: final-epoch metrics as mean and std over seeds,
and the plain-text table the CLI prints."""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["SUMMARY_METRICS", "SUMMARY_COLUMNS", "mean_std", "summarize", "format_table"]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


SUMMARY_METRICS = ["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "wall_time",
                   "backprops", "hvps", "steps"]


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per optimizer: mean and std over seeds of each run's final-epoch metrics."""
    last: Dict[Tuple[str, int], Dict[str, Any]] = {}
    order: List[str] = []
    for r in rows:
        if r["optimizer"] not in order:
            order.append(r["optimizer"])
        key = (r["optimizer"], r["seed"])
        if key not in last or r["epoch"] >= last[key]["epoch"]:
            last[key] = r
    out = []
    for name in order:
        finals = [r for (o, _), r in last.items() if o == name]
        s: Dict[str, Any] = {"optimizer": name, "seeds": len(finals), "epochs": max(r["epoch"] for r in finals),
                             "diverged": sum(bool(r.get("diverged")) for r in finals)}
        for m in SUMMARY_METRICS:
            s[m + "_mean"], s[m + "_std"] = mean_std([r[m] for r in finals])
        out.append(s)
    return out


def format_table(summary: Sequence[Dict[str, Any]], task: str = "classification") -> str:
    """A plain-text table: final metrics as mean ± std over seeds (accuracies in %)."""
    def pm(s, m, scale=1.0, fmt="{:.2f}"):
        mu, sd = s[m + "_mean"], s[m + "_std"]
        if mu is None or math.isnan(mu):
            return "-"
        if s["seeds"] < 2:
            return fmt.format(mu * scale)
        return f"{fmt.format(mu * scale)} ± {fmt.format(sd * scale)}"
    if task == "classification":
        cols = [("train acc %", "train_acc", 100.0, "{:.2f}"), ("val acc %", "val_acc", 100.0, "{:.2f}"),
                ("test acc %", "test_acc", 100.0, "{:.2f}"), ("train loss", "train_loss", 1.0, "{:.4f}"),
                ("test loss", "test_loss", 1.0, "{:.4f}")]
    else:
        cols = [("train loss", "train_loss", 1.0, "{:.5f}"), ("val loss", "val_loss", 1.0, "{:.5f}"),
                ("test loss", "test_loss", 1.0, "{:.5f}")]
    cols += [("train time s", "wall_time", 1.0, "{:.2f}")]
    header = ["optimizer", "seeds"] + [c[0] for c in cols] + ["backprops", "HVPs"]
    body = []
    for s in summary:
        bp, hv = s["backprops_mean"], s["hvps_mean"]
        body.append([s["optimizer"] + (f" ({s['diverged']} diverged)" if s["diverged"] else ""), str(s["seeds"])]
                    + [pm(s, m, sc, f) for _, m, sc, f in cols]
                    + ["-" if math.isnan(bp) else f"{bp:.0f}", "-" if math.isnan(hv) else f"{hv:.0f}"])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), "-+-".join("-" * w for w in widths)] + [line(r) for r in body])


#: columns of summary.csv
SUMMARY_COLUMNS = ["optimizer", "seeds", "epochs", "diverged"] + [f"{m}_{s}" for m in SUMMARY_METRICS
                                                                  for s in ("mean", "std")]
