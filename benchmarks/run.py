"""Run the benchmark rows of every module in MODULES and write a report.

    python -m benchmarks                 # all op rows, CPU (and CUDA when present), ResNet-18 + ResNet-50
    python -m benchmarks --quick         # CI-sized: ResNet-18's last 16 tensors, 3 rounds, short samples
    python -m benchmarks --ops oja_step,svrg_step --device cuda
    python -m benchmarks --all           # op rows + HVP engines + end-to-end optimizer steps (1 and 2 threads)
    python -m benchmarks --ops svrg_step --e2e --e2e-models lenet5 --threads 1   # one end-to-end table

Writes results/benchmarks/{ops,hvp}.{json,csv}, ops_speedup.png, ops_bandwidth.png, hvp.png and
summary.md (the markdown the README embeds).

How the op rows are timed (benchmarks.rounds, benchmarks.variants, benchmarks.noise): for each
(device, parameter list, op), every variant is set up and called twice before its first sample
(compilation, lazy state and warm temporaries happen there); then ``--rounds`` rounds each time every
variant once, in an order rotated per round, and a row reports the min / median / max of its
rounds. The op's headline is the fused row against best_unfused, the fastest (by median) of its
foreach-warm, foreach-cold and compiled rows. GB/s counts each op's minimal traffic per
parameter (stated in its module; torch's Adam reference row: 28 B/param) and is compared with
the copy bandwidth of the same list (torch._foreach_copy_, 8 B/param), measured at the start and
at the end of the run (the higher of the two is the yardstick). The run is flagged noisy when the
two copy figures differ by more than 15 %, or when any row's (max - min) / median exceeds 25 %
(that row is flagged).
"""
from __future__ import annotations

import argparse
import csv
import gc
import importlib
import json
import os
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from benchmarks.common import error_text, machine_info, make_params, model_shapes
from benchmarks.noise import COPY_DRIFT_TOL, SPREAD_TOL, flag_noise, summarize
from benchmarks.rounds import interleaved

# Modules that contribute rows (each defines cases() -> list[Case]). Families add theirs here.
MODULES = ["benchmarks.ops_foundation", "benchmarks.ops_natasha", "benchmarks.ops_trust_region", "benchmarks.ops_kfac",
           "benchmarks.ops_adahessian", "benchmarks.ops_torch_adam"]
ALWAYS = ("adam (torch.optim)",)  # reference rows kept under --ops
COPY_BYTES_PER_PARAM = 8


def collect_groups(only=None):
    """Cases by op, in module order; ``only`` keeps those ops (and the reference rows)."""
    groups = defaultdict(list)
    for name in MODULES:
        for case in importlib.import_module(name).cases():
            groups[case.op].append(case)
    if only and not set(only) <= set(groups):
        raise ValueError(f"--ops: unknown op(s) {sorted(set(only) - set(groups))}; known: {sorted(groups)}")
    return {op: cases for op, cases in groups.items() if not only or op in only or op in ALWAYS}



def time_op(device, cases, ts, rounds, sample_s):
    """Samples (seconds per call) and set-up errors of one op's variants, timed in interleaved rounds."""
    fns, errors = {}, {}
    for case in cases:
        try:
            fn = case.setup([t.clone() for t in ts])
            fn()  # compiles the compiled row, allocates lazy state and the warm temporaries;
            # interleaved() makes the second call (its calibration) before any sample
            if device == "cuda":
                torch.cuda.synchronize()  # an asynchronous error belongs to this row
            fns[case.variant] = fn
        except Exception as exc:  # a peer not installed, a path not built, a form that does not compile
            errors[case.variant] = error_text(exc)
    return interleaved(fns, device, rounds, sample_s), errors


def copy_gbps(device, shapes, rounds, sample_s):
    """GB/s of torch._foreach_copy_ over a parameter list (read + write: 8 B/param), median of rounds."""
    src = make_params(shapes, device)
    dst = [torch.empty_like(t) for t in src]
    samples = interleaved({"copy": lambda: torch._foreach_copy_(dst, src)}, device, rounds, sample_s)["copy"]
    return COPY_BYTES_PER_PARAM * sum(t.numel() for t in src) / summarize(samples)["median"] / 1e9


def run_ops(devices, shapes, rounds, sample_s, only=None):
    """Rows of every op on every device and parameter list (shapes: name -> list of shapes), the
    copy figures (name -> (start, end) GB/s) and the run's noise verdict (noisy, reasons)."""
    groups = collect_groups(only)
    models = list(shapes)
    lists = [(d, m) for d in devices for m in models]
    copy = {key: [copy_gbps(key[0], shapes[key[1]], rounds, sample_s)] for key in lists}
    todo = [(d, m, op, cs) for d, m in lists for op, cases in groups.items()
            if (cs := [c for c in cases if d in c.devices])]
    rows, current, ts = [], None, None
    bar = tqdm(todo, desc="benchmarks", unit="op", dynamic_ncols=True)
    for device, model, op, cases in bar:
        bar.set_postfix_str(f"{device} {model} {op}")
        if current != (device, model):
            ts = None
            gc.collect()
            ts, current = make_params(shapes[model], device), (device, model)
        samples, errors = time_op(device, cases, ts, rounds, sample_s)
        n = sum(t.numel() for t in ts)
        for case in cases:
            st = summarize(samples.get(case.variant, []))
            rows.append({"device": device, "model": model, "tensors": len(ts), "params": n, "op": op,
                         "variant": case.variant, "role": case.role, "bytes_per_param": case.bytes_per_param,
                         "rounds": len(samples.get(case.variant, [])), "ms": st["median"] * 1e3,
                         "ms_min": st["min"] * 1e3, "ms_max": st["max"] * 1e3, "spread": st["spread"],
                         "note": case.note, "error": errors.get(case.variant, "")})
    ts = None
    gc.collect()
    for key in lists:
        copy[key].append(copy_gbps(key[0], shapes[key[1]], rounds, sample_s))
    copy = {f"{d} {m}": tuple(v) for (d, m), v in copy.items()}
    derive_columns(rows, copy)
    noisy, reasons = flag_noise(copy, rows)
    for r in rows:
        r["run_noisy"] = noisy
    return rows, copy, noisy, reasons


def derive_columns(rows, copy):
    """GB/s, % of copy, best_unfused and the speed-ups, per (device, model, op)."""
    by_op = defaultdict(list)
    for r in rows:
        by_op[(r["device"], r["model"], r["op"])].append(r)
    for (device, model, op), rs in by_op.items():
        fused = next((r["ms"] for r in rs if r["role"] == "fused"), float("nan"))
        baselines = [r for r in rs if r["role"] == "baseline" and r["ms"] == r["ms"]]
        best = min(baselines, key=lambda r: r["ms"]) if baselines else None
        for r in rs:
            yardstick = max(copy[f"{device} {model}"])
            r["GBps"] = r["bytes_per_param"] * r["params"] / (r["ms"] / 1e3) / 1e9 if r["bytes_per_param"] else float("nan")
            r["copy_GBps"] = yardstick
            r["pct_of_copy"] = 100 * r["GBps"] / yardstick
            r["x_fused"] = r["ms"] / fused  # time / fused time
            r["best_unfused"] = best["variant"] if best else ""
            r["speedup_vs_best_unfused"] = best["ms"] / r["ms"] if best else float("nan")
    adam = {(r["device"], r["model"]): r["GBps"] for r in rows if r["op"] == "adam (torch.optim)" and r["role"] == "fused"}
    for r in rows:
        r["pct_of_adam_fused"] = 100 * r["GBps"] / adam.get((r["device"], r["model"]), float("nan"))


def noise_lines(copy, noisy, reasons):
    lines = [f"copy bandwidth {label}: {start:.1f} GB/s at the start, {end:.1f} at the end"
             for label, (start, end) in copy.items()]
    if noisy:
        lines.append(f"NOISY RUN ({len(reasons)} reason(s); thresholds: copy drift > {100 * COPY_DRIFT_TOL:.0f} %, "
                     f"row spread > {100 * SPREAD_TOL:.0f} %; rows marked '!'):")
        lines += [f"  {x}" for x in reasons]
    else:
        lines.append("run not flagged noisy (copy drift and every row's spread within thresholds)")
    return lines


def print_table(rows, copy, noisy, reasons):
    print("\n".join(noise_lines(copy, noisy, reasons)))
    hdr = (f"{'device':6} {'model':14} {'op':26} {'variant':15} {'B/p':>3} {'ms':>9} {'min':>9} {'max':>9} "
           f"{'spread':>6} {'GB/s':>7} {'%copy':>6} {'x best':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['device']:6} {r['model']:14} {r['op']:26} {r['variant']:15} {r['bytes_per_param']:3d} {r['ms']:9.3f} "
              f"{r['ms_min']:9.3f} {r['ms_max']:9.3f} {100 * r['spread']:5.0f}% {r['GBps']:7.1f} "
              f"{r['pct_of_copy']:6.1f} {r['speedup_vs_best_unfused']:6.2f}" + (" !" if r["noisy"] else "")
              + (f"  ({r['error']})" if r["error"] else ""))
    print("x best: best_unfused time / this row's time (> 1: faster than the best unfused form); "
          "'!': row spread > 25 %")


def headline(rows):
    """The fused row of every op with a best_unfused, in run order."""
    return [r for r in rows if r["role"] == "fused" and r["best_unfused"]]


def plot(rows, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for r in headline(rows):
        groups[(r["device"], r["model"])].append(r)
    if not groups:
        return
    best = {(r["device"], r["model"], r["op"]): r for r in rows if r["variant"] == r["best_unfused"]}
    for kind, name in (("speedup", "ops_speedup.png"), ("bandwidth", "ops_bandwidth.png")):
        fig, axes = plt.subplots(len(groups), 1, figsize=(11, 3.8 * len(groups)), squeeze=False)
        for ax, ((device, model), rs) in zip(axes[:, 0], sorted(groups.items())):
            if kind == "bandwidth":  # per-layer rows (0 B/param) have no GB/s
                rs = [r for r in rs if r["bytes_per_param"]]
            x = range(len(rs))
            hatch = ["//" if r["noisy"] or best[(device, model, r["op"])]["noisy"] else "" for r in rs]
            if kind == "speedup":
                ax.bar(x, [r["speedup_vs_best_unfused"] for r in rs], color="tab:green", hatch=hatch)
                ax.set_xticks(x, [f"{r['op']}\nvs {r['best_unfused']}" for r in rs], fontsize=7, rotation=60, ha="right")
                ax.set_ylabel("best_unfused time / fused time")
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.5)
            else:
                w = 0.4
                ax.bar([i - w / 2 for i in x], [r["pct_of_copy"] for r in rs], w, color="tab:green", hatch=hatch,
                       label="fused")
                ax.bar([i + w / 2 for i in x], [best[(device, model, r["op"])]["pct_of_copy"] for r in rs], w,
                       color="tab:gray", label="best_unfused")
                ax.set_xticks(x, [f"{r['op']}\n({r['bytes_per_param']} B/param)" for r in rs], fontsize=7,
                              rotation=60, ha="right")
                ax.set_ylabel("% of copy bandwidth")
                ax.axhline(100.0, color="k", lw=0.5, label="copy")
                adam = [r["pct_of_copy"] for r in rs if r["op"] == "adam (torch.optim)"]
                if adam:
                    ax.axhline(adam[0], color="tab:blue", lw=0.8, ls="--", label="torch fused Adam")
                ax.legend(fontsize=7)
            info = machine_info(device)
            ax.set_title(f"{device} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), {model} parameter "
                         f"list, torch {info['torch']}; hatched: noisy (row spread > 25 %)", fontsize=9)
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


def write_summary(rows, copy, noisy, reasons, out_dir, meta, hvp_rows=None, e2e_rows=None, tta_rows=None):
    lines = [f"# Benchmark summary ({meta['date']})", ""]
    for d, info in meta["machines"].items():
        lines.append(f"- **{d}**: {info.get('gpu', info['cpu'])}, torch {info['torch']}, {info['threads']} threads")
    lines.append(f"- {meta['rounds']} interleaved rounds per row (min / median / max reported); "
                 "GB/s counts each op's minimal traffic (B/param column), torch Adam 28 B/param")
    lines += [f"- {x}" if not x.startswith("  ") else f"  - {x.strip()}" for x in noise_lines(copy, noisy, reasons)]
    lines += ["", "### Fused kernel against the best unfused form (foreach warm / cold, compiled)", "",
              "| device | model | op | B/param | fused ms (min–max) | best_unfused | its ms | speed-up | fused GB/s "
              "| % copy | % torch fused Adam GB/s | noisy |",
              "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    best = {(r["device"], r["model"], r["op"]): r for r in rows if r["variant"] == r["best_unfused"]}
    for r in headline(rows):
        b = best[(r["device"], r["model"], r["op"])]
        flag = "yes" if r["noisy"] or b["noisy"] else ""
        lines.append(f"| {r['device']} | {r['model']} | {r['op']} | {r['bytes_per_param']} | {r['ms']:.3f} "
                     f"({r['ms_min']:.3f}–{r['ms_max']:.3f}) | {r['best_unfused']} | {b['ms']:.3f} | "
                     f"{r['speedup_vs_best_unfused']:.2f} | {r['GBps']:.1f} | {r['pct_of_copy']:.1f} | "
                     f"{r['pct_of_adam_fused']:.0f} | {flag} |")
    lines += ["", "### Every row", "",
              "| device | model | op | variant | ms | min | max | spread | GB/s | % copy | × best_unfused | noisy | error |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['model']} | {r['op']} | {r['variant']} | {r['ms']:.3f} | {r['ms_min']:.3f} | "
                     f"{r['ms_max']:.3f} | {100 * r['spread']:.0f} % | {r['GBps']:.1f} | {r['pct_of_copy']:.1f} | "
                     f"{r['speedup_vs_best_unfused']:.2f} | {'yes' if r['noisy'] else ''} | {r['error']} |")
    if hvp_rows:
        lines += ["", "### Hessian-vector products (time as a multiple of one forward+backward)", "",
                  "| device | model | batch | engine | ms | × fwd+bwd |", "|---|---|---:|---|---:|---:|"]
        for r in hvp_rows:
            lines.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['engine']} | {r['ms']:.2f} | "
                         f"{r['x_fwd_bwd']:.2f} |")
    if e2e_rows:
        from benchmarks.end_to_end import markdown

        lines += ["", markdown(e2e_rows)]
    if tta_rows:
        from benchmarks.time_to_accuracy import markdown

        lines += ["", markdown(tta_rows)]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized run: ResNet-18's last 16 tensors, 3 rounds, short samples")
    ap.add_argument("--all", action="store_true", help="every row and every model (the default set)")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--models", default=None,
                    help="comma list of torchvision models for the shapes (sliceable: resnet18[-16:])")
    ap.add_argument("--ops", default=None, help="comma list of ops to run (default: all; torch Adam's rows always)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the whole run (default: torch's own choice)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per row (default 7; 3 with --quick)")
    ap.add_argument("--hvp", action="store_true", help="also benchmark the HVP engines (LeNet-5, ResNet-18)")
    ap.add_argument("--e2e", action="store_true", help="also time a training step of every optimizer")
    ap.add_argument("--e2e-models", default=None,
                    help="comma list of --e2e models (CPU: lenet5,resnet18 (default both); CUDA: resnet18)")
    ap.add_argument("--e2e-optimizers", default=None,
                    help="comma list of --e2e rows by label (default: every optimizer, anchor and peer)")
    ap.add_argument("--leak-steps", default="10,200",
                    help="--e2e leak check: memory after step EARLY vs after step LATE (default 10,200)")
    ap.add_argument("--no-memory", action="store_true", help="--e2e without the memory and leak probes")
    ap.add_argument("--tta", action="store_true",
                    help="also train every optimizer on MNIST to a target accuracy (minutes; part of --all)")
    ap.add_argument("--target", type=float, default=0.90, help="training accuracy target of --tta")
    ap.add_argument("--out", default="results/benchmarks")
    args = ap.parse_args(argv)

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    if rounds < 1:
        ap.error(f"--rounds must be >= 1, got {rounds}")
    models = args.models.split(",") if args.models else (["resnet18[-16:]"] if args.quick else ["resnet18", "resnet50"])
    min_time = 0.1 if args.quick else 0.5  # HVP timing window
    sample_s = 0.02 if args.quick else 0.1  # one op sample (per variant per round)
    e2e_sample_s = 0.1 if args.quick else 0.5  # one end-to-end sample (whole periods of steps)
    try:
        leak_early, leak_late = (int(v) for v in args.leak_steps.split(","))
    except ValueError:
        ap.error(f"--leak-steps must be EARLY,LATE (two integers), got {args.leak_steps!r}")
    if not 1 <= leak_early or leak_late < leak_early + 2:
        ap.error(f"--leak-steps needs 1 <= EARLY and LATE >= EARLY + 2, got {args.leak_steps!r}")
    os.makedirs(args.out, exist_ok=True)
    from natasha_ext import ops

    if not ops.fused_available():
        print("warning: compiled kernels not loaded; 'fused' rows will be errors")
    try:
        shapes = {m: model_shapes(m) for m in models}
        rows, copy, noisy, reasons = run_ops(devices, shapes, rounds, sample_s, args.ops.split(",") if args.ops else None)
    except ValueError as exc:
        ap.error(str(exc))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machines": {d: machine_info(d) for d in devices},
            "rounds": rounds, "sample_s": sample_s,
            "copy_GBps": {k: {"start": v[0], "end": v[1]} for k, v in copy.items()},
            "noisy": noisy, "noise_reasons": reasons,
            "thresholds": {"copy_drift": COPY_DRIFT_TOL, "row_spread": SPREAD_TOL},
            "bytes_per_param": {r["op"]: r["bytes_per_param"] for r in rows}}
    print_table(rows, copy, noisy, reasons)
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

        e2e_threads = [args.threads] if args.threads is not None else [1, 2]
        try:
            e2e_rows = run_e2e(devices, e2e_threads, rounds, e2e_sample_s,
                               args.e2e_models.split(",") if args.e2e_models else None,
                               args.e2e_optimizers.split(",") if args.e2e_optimizers else None,
                               memory=not args.no_memory, early=leak_early, late=leak_late)
        except ValueError as exc:
            ap.error(str(exc))
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
    write_summary(rows, copy, noisy, reasons, args.out, meta, hvp_rows, e2e_rows, tta_rows)
    print(f"wrote {args.out}/: ops.json/csv, ops_speedup.png, ops_bandwidth.png"
          + (", hvp.json/csv, hvp.png" if hvp_rows else "") + ", summary.md")


if __name__ == "__main__":
    main()
