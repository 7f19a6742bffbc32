"""curves.png: the training curves of a run."""
from __future__ import annotations

import math
import os
import statistics
from typing import Any, Dict, Sequence

from natasha_ext.training.summary import mean_std

__all__ = ["plot_curves"]


def plot_curves(rows: Sequence[Dict[str, Any]], path: os.PathLike, title: str = "",
                task: str = "classification") -> None:
    """curves.png: mean over seeds (± std band) per optimizer of train/val loss and val/test
    accuracy by epoch, and train loss against gradient + HVP evaluations."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    has_val = any(not math.isnan(r["val_loss"]) for r in rows)
    split = "val" if has_val else "test"
    panels = [("train_loss", "epoch", "train loss", True), (f"{split}_loss", "epoch", f"{split} loss", True),
              ("train_loss", "cost", "train loss", True)]
    if task == "classification":
        panels += [(f"{split}_acc", "epoch", f"{split} accuracy", False),
                   ("test_acc" if has_val else "train_acc", "epoch",
                    "test accuracy" if has_val else "train accuracy", False)]
    else:
        panels += [("test_loss", "epoch", "test loss", True)]
    panels.append(("train_loss", "wall_time", "train loss", True))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.flatten()
    for ax in axes[len(panels):]:
        ax.axis("off")
    for ax, (metric, xkey, ylabel, logy) in zip(axes, panels):
        for name in names:
            rs = [r for r in rows if r["optimizer"] == name]
            epochs = sorted({r["epoch"] for r in rs})
            xs, mus, sds = [], [], []
            for e in epochs:
                at = [r for r in rs if r["epoch"] == e]
                vals = [r[metric] for r in at if r[metric] is not None and math.isfinite(r[metric])]
                if not vals:
                    continue
                if xkey == "cost":
                    xs.append(statistics.fmean(r["backprops"] + r["hvps"] for r in at))
                else:
                    xs.append(statistics.fmean(r[xkey] for r in at))
                mu, sd = mean_std(vals)
                mus.append(mu)
                sds.append(sd)
            if not xs:
                continue
            (ln,) = ax.plot(xs, mus, marker="o", markersize=2.5, label=name)
            if any(sd > 0 for sd in sds):
                ax.fill_between(xs, [m - s for m, s in zip(mus, sds)], [m + s for m, s in zip(mus, sds)],
                                color=ln.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel({"epoch": "epoch", "cost": "gradient + HVP evaluations", "wall_time": "train time (s)"}[xkey])
        ax.set_ylabel(ylabel)
        if logy and all(r[metric] is None or not math.isfinite(r[metric]) or r[metric] > 0 for r in rows):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
