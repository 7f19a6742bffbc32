"""Time (and backpropagations) to a target training accuracy for every optimizer the CLI knows,
on real MNIST with LeNet-5, through the same training program users run
(``natasha_ext.training.run``). The accuracy is measured once per epoch, so the times are
resolved to an epoch: "reached at epoch e" means the evaluation after epoch e was >= target.

Each optimizer runs with its paper defaults; one learning rate for all would favour none, but the
defaults come from different papers and models, so read the table as "out of the box" behaviour.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

import torch


def run_tta(devices: Sequence[str], quick: bool, target: float = 0.90, out: str = "results/benchmarks") -> List[Dict]:
    from natasha_ext.training import TrainConfig, run

    rows: List[Dict] = []
    for device in devices:
        subset, epochs = ("2000/500/500", 4) if quick else ("4000/1000/1000", 6)
        args = TrainConfig(model="lenet5", dataset="mnist", subset=subset, epochs=epochs, batch_size=50, seeds=[0],
                           optimizers=["all"], progress=False, verbose=False, plot=False, checkpoint=False,
                           device=device, out=os.path.join(out, f"tta_{device}"))
        history = run(args)["history"]
        for name in args.optimizers:
            per_seed = []
            for seed in args.seeds:
                hist = [r for r in history if r["optimizer"] == name and r["seed"] == seed]
                hit = next((r for r in hist if r["epoch"] > 0 and r["train_acc"] >= target), None)
                last = hist[-1]
                per_seed.append((hit, last))
            hits = [h for h, _ in per_seed if h is not None]
            mean = lambda key: (sum(h[key] for h in hits) / len(hits)) if len(hits) == len(per_seed) else math.nan
            rows.append({
                "device": device, "model": "lenet5", "subset": subset, "optimizer": name, "target": target,
                "reached": f"{len(hits)}/{len(per_seed)}", "seconds": mean("wall_time"), "epochs": mean("epoch"),
                "backprops": mean("backprops"),
                "final_train_acc": sum(l["train_acc"] for _, l in per_seed) / len(per_seed),
                "final_test_acc": sum(l["test_acc"] for _, l in per_seed) / len(per_seed),
                "seconds_per_epoch": sum(l["wall_time"] / max(l["epoch"], 1) for _, l in per_seed) / len(per_seed)})
        _plot(history, device, target, os.path.join(out, f"time_to_accuracy_{device}.png"))
    return rows


def _plot(history, device, target, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["optimizer"] for r in history):
        seed0 = min(r["seed"] for r in history if r["optimizer"] == name)
        hist = [r for r in history if r["optimizer"] == name and r["seed"] == seed0]
        ax.plot([r["wall_time"] for r in hist], [r["train_acc"] for r in hist], marker="o", ms=3, label=name)
    ax.axhline(target, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training accuracy")
    ax.set_ylim(0.5, 1.0)
    ax.set_title(f"LeNet-5 on MNIST, {device}: training accuracy vs time (seed {seed0})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tta(rows):
    print(f"{'device':6} {'optimizer':14} {'reached':>7} {'seconds':>8} {'epochs':>6} {'backprops':>9} "
          f"{'s/epoch':>8} {'test acc':>8}")
    for r in rows:
        print(f"{r['device']:6} {r['optimizer']:14} {r['reached']:>7} {r['seconds']:8.1f} {r['epochs']:6.1f} "
              f"{r['backprops']:9.0f} {r['seconds_per_epoch']:8.2f} {r['final_test_acc']:8.4f}")


def markdown(rows) -> str:
    if not rows:
        return ""
    t = rows[0]["target"]
    lines = [f"### Time to {t:.0%} training accuracy (LeNet-5, MNIST {rows[0]['subset']}, batch 50, paper defaults)",
             "", "| device | optimizer | seeds reaching | seconds | epochs | backprops | s/epoch | final test acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = lambda v, fmt: "—" if not math.isfinite(v) else fmt.format(v)
        lines.append(f"| {r['device']} | {r['optimizer']} | {r['reached']} | {f(r['seconds'], '{:.1f}')} | "
                     f"{f(r['epochs'], '{:.1f}')} | {f(r['backprops'], '{:.0f}')} | {r['seconds_per_epoch']:.2f} | "
                     f"{r['final_test_acc']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_tta(run_tta(["cpu"], quick=True))
