"""Run the benchmark rows of every module in MODULES and write a report.

    python -m benchmarks                 # all op rows, CPU (and CUDA when present), ResNet-18 + ResNet-50
    python -m benchmarks --quick         # CI-sized: ResNet-18 shapes only, short timing windows
    python -m benchmarks --ops oja_step,svrg_step --device cuda
    python -m benchmarks --all           # op rows + HVP engines + end-to-end optimizer steps

Writes results/benchmarks/{ops,hvp}.{json,csv}, ops_speedup.png, ops_bandwidth.png, hvp.png and
summary.md (the markdown the README embeds).
Every row states its device; the copy bandwidth of the same device in the same run is the yardstick
for GB/s (a fused elementwise op should approach it).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from benchmarks.common import copy_bandwidth, machine_info, make_params, model_shapes, time_fn

# Modules that contribute rows (each defines cases() -> list[Case]). Families add theirs here.
MODULES = ["benchmarks.ops_foundation", "benchmarks.ops_natasha", "benchmarks.ops_trust_region", "benchmarks.ops_kfac",
           "benchmarks.ops_adahessian"]


def collect_cases(only=None):
    cases = []
    for name in MODULES:
        cases += importlib.import_module(name).cases()
    if only:
        cases = [c for c in cases if c.op in only]
    return cases


def run_ops(devices, models, min_time, only=None):
    rows, bw = [], {}
    cases = collect_cases(only)
    todo = [(d, m, c) for d in devices for m in models for c in cases if d in c.devices]
    shapes_cache, params_cache = {}, {}
    for d in devices:
        bw[d] = copy_bandwidth(d, 1 << 24, min_time)
    bar = tqdm(todo, desc="benchmarks", unit="row", dynamic_ncols=True)
    for device, model, case in bar:
        bar.set_postfix_str(f"{device} {model} {case.op}/{case.variant}")
        if model not in shapes_cache:
            shapes_cache[model] = model_shapes(model)
        key = (device, model)
        if key not in params_cache:
            params_cache.clear()
            params_cache[key] = make_params(shapes_cache[model], device)
        ts = params_cache[key]
        n = sum(t.numel() for t in ts)
        try:
            fn = case.setup([t.clone() for t in ts])
            sec = time_fn(fn, device, min_time)
            err = ""
        except Exception as exc:  # a peer that is not installed, a path not built ...
            sec, err = float("nan"), f"{type(exc).__name__}: {exc}"[:200]
        rows.append({"device": device, "model": model, "tensors": len(ts), "params": n, "op": case.op,
                     "variant": case.variant, "ms": sec * 1e3,
                     "GBps": case.bytes_per_param * n / sec / 1e9 if sec == sec else float("nan"),
                     "copy_GBps": bw[device], "note": case.note, "error": err})
    # speed-up of the fused row over every other variant of the same (device, model, op)
    fused = {(r["device"], r["model"], r["op"]): r["ms"] for r in rows if r["variant"] == "fused"}
    for r in rows:
        f = fused.get((r["device"], r["model"], r["op"]))
        r["fused_speedup"] = r["ms"] / f if f else float("nan")
        r["pct_of_copy"] = 100 * r["GBps"] / r["copy_GBps"]
    return rows, bw


def print_table(rows):
    hdr = f"{'device':6} {'model':9} {'op':22} {'variant':16} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'fused x':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['device']:6} {r['model']:9} {r['op']:22} {r['variant']:16} {r['ms']:9.3f} {r['GBps']:8.1f} "
              f"{r['pct_of_copy']:6.1f} {r['fused_speedup']:8.2f}" + (f"  ({r['error']})" if r["error"] else ""))


def plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["model"])].append(r)
    for kind, field, ylabel, name in (("speedup", "fused_speedup", "time / fused time", "ops_speedup.png"),
                                      ("bandwidth", "pct_of_copy", "% of copy bandwidth", "ops_bandwidth.png")):
        fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.6 * len(groups)), squeeze=False)
        for ax, ((device, model), rs) in zip(axes[:, 0], sorted(groups.items())):
            labels = [f"{r['op']}\n{r['variant']}" for r in rs]
            vals = [r[field] for r in rs]
            colors = ["tab:green" if r["variant"] == "fused" else "tab:gray" for r in rs]
            ax.bar(range(len(rs)), vals, color=colors)
            ax.set_xticks(range(len(rs)), labels, fontsize=7, rotation=60, ha="right")
            ax.set_ylabel(ylabel)
            if kind == "speedup":
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.5)
            else:
                ax.axhline(100.0, color="k", lw=0.5)
            info = machine_info(device)
            ax.set_title(f"{device} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
                         f"{model} parameter list, torch {info['torch']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)


def write_csv_json(name, rows, out_dir, meta):
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def plot_hvp(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["device"], r["model"]) for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(engines)
    for i, e in enumerate(engines):
        vals = [next((r["x_fwd_bwd"] for r in rows if (r["device"], r["model"]) == k and r["engine"] == e), 0)
                for k in keys]
        ax.bar([j + i * w for j in range(len(keys))], vals, w, label=e)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], [f"{d}\n{m}" for d, m in keys])
    ax.set_ylabel("time / (forward+backward)")
    ax.axhline(2.5, color="k", lw=0.6, ls="--", label="target 2.5x")
    ax.legend(fontsize=8)
    ax.set_title(f"Hessian-vector product engines, torch {torch.__version__}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "hvp.png"), dpi=110)
    plt.close(fig)


def write_summary(rows, bw, out_dir, meta, hvp_rows=None, e2e_rows=None, tta_rows=None):
    lines = [f"# Benchmark summary ({meta['date']})", ""]
    for d, b in bw.items():
        info = machine_info(d)
        lines.append(f"- **{d}**: {info.get('gpu', info['cpu'])}, torch {info['torch']}, "
                     f"{info['threads']} threads, copy bandwidth {b:.1f} GB/s")
    lines += ["", "| device | model | op | variant | ms | GB/s | % copy | fused speed-up |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['model']} | {r['op']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['GBps']:.1f} | {r['pct_of_copy']:.1f} | {r['fused_speedup']:.2f} |")
    if hvp_rows:
        lines += ["", "### Hessian-vector products (time as a multiple of one forward+backward)", "",
                  "| device | model | batch | engine | ms | × fwd+bwd |", "|---|---|---:|---|---:|---:|"]
        for r in hvp_rows:
            lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['engine']} | {r['ms']:.2f} | "
                         f"{r['x_fwd_bwd']:.2f} |")
    if e2e_rows:
        lines += ["", "### End to end: one training step on a fixed minibatch", "",
                  "| device | model | batch | optimizer | ms/step | × SGD | state MB |", "|---|---|---:|---|---:|---:|---:|"]
        for r in e2e_rows:
            lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['optimizer']} | {r['ms_per_step']:.2f} | "
                         f"{r['x_sgd']:.2f} | {r['state_MB']:.2f} |" + (f" {r['error']}" if r["error"] else ""))
    if tta_rows:
        from benchmarks.time_to_accuracy import markdown

        lines += ["", markdown(tta_rows)]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized run: ResNet-18 shapes, short windows")
    ap.add_argument("--all", action="store_true", help="every row and every model (the default set)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--models", default=None, help="comma list of torchvision models for the shapes")
    ap.add_argument("--ops", default=None, help="comma list of ops to run (default: all)")
    ap.add_argument("--hvp", action="store_true", help="also benchmark the HVP engines (LeNet-5, ResNet-18)")
    ap.add_argument("--e2e", action="store_true", help="also time a training step of every optimizer")
    ap.add_argument("--tta", action="store_true",
                    help="also train every optimizer on MNIST to a target accuracy (minutes; part of --all)")
    ap.add_argument("--target", type=float, default=0.90, help="training accuracy target of --tta")
    ap.add_argument("--out", default="results/benchmarks")
    args = ap.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    models = args.models.split(",") if args.models else (["resnet18"] if args.quick else ["resnet18", "resnet50"])
    min_time = 0.1 if args.quick else 0.5
    os.makedirs(args.out, exist_ok=True)
    from natasha_ext import ops

    if not ops.fused_available():
        print("warning: compiled kernels not loaded; 'fused' rows will be errors")
    rows, bw = run_ops(devices, models, min_time, args.ops.split(",") if args.ops else None)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machines": {d: machine_info(d) for d in devices},
            "copy_GBps": bw}
    print_table(rows)
    write_csv_json("ops", rows, args.out, meta)
    plot(rows, args.out)
    hvp_rows = None
    if args.hvp or args.all or args.quick:
        from benchmarks.hvp import print_hvp, run_hvp

        hvp_rows = run_hvp(devices, args.quick, min_time)
        print()
        print_hvp(hvp_rows)
        write_csv_json("hvp", hvp_rows, args.out, meta)
        plot_hvp(hvp_rows, args.out)
    e2e_rows = None
    if args.e2e or args.all:
        from benchmarks.end_to_end import print_e2e, run_e2e

        e2e_rows = run_e2e(devices, args.quick, min_time)
        print()
        print_e2e(e2e_rows)
        write_csv_json("end_to_end", e2e_rows, args.out, meta)
    tta_rows = None
    if args.tta or args.all:
        from benchmarks.time_to_accuracy import print_tta, run_tta

        tta_rows = run_tta(devices, args.quick, args.target, args.out)
        print()
        print_tta(tta_rows)
        write_csv_json("time_to_accuracy", tta_rows, args.out, meta)
    write_summary(rows, bw, args.out, meta, hvp_rows, e2e_rows, tta_rows)
    print(f"wrote {args.out}/: ops.json/csv, ops_speedup.png, ops_bandwidth.png"
          + (", hvp.json/csv, hvp.png" if hvp_rows else "") + ", summary.md")


if __name__ == "__main__":
    main()
