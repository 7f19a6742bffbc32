"""End to end: time per training step of every optimizer the CLI knows (natasha_ext.cli_optimizers),
its fused path beside its reference path, against torch.optim anchors and the AdaHessian peers;
peak memory and a leak check for AdaHessian, its peers and SGD.

Rows per (device, model, threads):
  ours     every optimizer of the package (CLI defaults) twice: path 'fused' and path 'reference'
           (the optimizer's ``fused`` switch, which every one of them reads per call, set to False),
           plus AdaHessian with update_each=4. Column fused/ref: fused median / reference median;
           flag SLOWER when the fused path was slower in every round and by more than FUSED_TOL
           at the median (a regression beyond the noise; fewer than MIN_ROUNDS rounds never flag).
  anchor   torch.optim SGD, SGD-momentum, Adam (path 'torch').
  peer     torch-optimizer's Adahessian and pytorch-optimizer's AdaHessian (also with
           update_period=4), driven as their users do: backward(create_graph=True), then step().
           A peer that is not installed is an error cell naming the package. Column x peer: our
           AdaHessian's time / the faster peer with the same curvature schedule (every step, or
           every 4th).

Timing: the rows of one (device, model, threads) are timed in interleaved rounds
(benchmarks.rounds; min / median / max of the rounds); one step runs untimed first (lazy state,
K-FAC's first inverses). An optimizer whose cost repeats over k steps (AdaHessian update_each,
K-FAC/ANG/IFANG cov_every and inv_every (their least common multiple), the Natasha epoch) is
sampled over whole multiples of k steps; Natasha2, whose outer iteration (Oja's algorithm, the
kick test, then an epoch unless it kicked) varies in length, over whole outer iterations.
The minibatch is fixed (CPU: LeNet-5 batch 128, ResNet-18 batch 32; CUDA: ResNet-18 batch 100),
28x28 one-channel input. The Hybrid stays in its SGD-momentum phase (no validation loss is
reported), which is what it costs until the switch.

Memory (benchmarks.memory, a fresh process per row, at the first thread count): peak above the
memory before the first step over ``late`` steps, and memory after step ``early`` vs ``late``.
"""
from __future__ import annotations

import functools
import importlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import error_text
from natasha_ext import ops
from benchmarks.memory import LEAK_TOL_MB, LEAK_TOL_REL, memory_probe
from benchmarks.noise import SPREAD_TOL, summarize
from benchmarks.rounds import CycleSteps, interleaved

FUSED_TOL = 0.03  # fused/ref above 1 + this (and slower in every round) flags the fused path
MIN_ROUNDS = 3
CONFIGS = {"cpu": {"lenet5": 128, "resnet18": 32}, "cuda": {"resnet18": 100}}
ANCHORS = ("sgd", "sgd-momentum", "adam")
# label -> (CLI name, overrides of its defaults)
FOR = ("hvp", "forward_over_reverse")
VARIANTS = {"adahessian update_each=4": ("adahessian", (("update_each", 4),)),
            "adahessian hvp=forward_over_reverse": ("adahessian", (FOR,)),
            "adahessian update_each=4 hvp=forward_over_reverse": ("adahessian", (("update_each", 4), FOR))}
# label -> (module, class, constructor overrides, the rows of ours it is compared with in x peer:
# the same curvature schedule); bootstrap installs both packages with --no-deps
_EVERY = ("adahessian", "adahessian hvp=forward_over_reverse")
_EACH4 = ("adahessian update_each=4", "adahessian update_each=4 hvp=forward_over_reverse")
PEERS = {"torch_optimizer.Adahessian": ("torch_optimizer", "Adahessian", (), _EVERY),
         "pytorch_optimizer.AdaHessian": ("pytorch_optimizer", "AdaHessian", (), _EVERY),
         "pytorch_optimizer.AdaHessian update_period=4": ("pytorch_optimizer", "AdaHessian", (("update_period", 4),),
                                                          _EACH4)}
MEMORY_ROWS = ("sgd", *_EVERY, *_EACH4, *PEERS)
# hyperparameters whose values' least common multiple is the number of steps over which an
# optimizer's cost repeats (K-FAC: statistics every cov_every steps, inverses every inv_every)
PERIOD_FLAGS = {"adahessian": ("update_each",), "kfac": ("cov_every", "inv_every"), "ang": ("cov_every", "inv_every"),
                "ifang": ("cov_every",), "natasha15": ("epoch_size",), "natasha2": ("epoch_size",)}


# optimizers whose cost repeats over a cycle of varying length -> whether the next step starts one:
# Natasha2's outer iteration (Oja's algorithm, the kick test, then an epoch unless it kicked)
CYCLES = {"natasha2": lambda opt: not opt.position["outer"] and not opt.position["in_epoch"]}


def cost_period(name: str, hp) -> int:
    """Steps over which the cost of optimizer ``name`` with hyperparameters ``hp`` repeats."""
    return math.lcm(*(int(getattr(hp, f, 1) or 1) for f in PERIOD_FLAGS.get(name, ())))


@dataclass(frozen=True)
class Spec:
    """One row's optimizer: label (what the table shows), kind ('ours', 'anchor', 'peer') and path
    ('fused', 'reference', 'torch' or 'peer')."""
    label: str
    kind: str
    path: str


def specs(only: Optional[Sequence[str]] = None) -> List[Spec]:
    """Every row's spec, in table order; ``only`` keeps those labels (and the SGD anchor, the x SGD unit)."""
    from natasha_ext import cli_optimizers

    ours = [n for n in cli_optimizers.OPTIMIZERS if n not in ANCHORS] + list(VARIANTS)
    out = [Spec(n, "anchor", "torch") for n in ANCHORS]
    out += [Spec(n, "ours", p) for n in ours for p in ("fused", "reference")]
    out += [Spec(n, "peer", "peer") for n in PEERS]
    if only:
        unknown = set(only) - {s.label for s in out}
        if unknown:
            raise ValueError(f"--e2e-optimizers: unknown {sorted(unknown)}; known: {sorted({s.label for s in out})}")
        out = [s for s in out if s.label in only or s.label == "sgd"]
    return out


def _hyperparameters(name: str, device: str, overrides):
    """What the optimizer's registry entry builds from: the CLI defaults of ``name`` on ``device``."""
    from natasha_ext.training import TrainConfig

    return TrainConfig(optimizers=[name], device=device).build_namespace(0, name, **dict(overrides))


def _peer(label: str):
    module, cls, overrides, _ = PEERS[label]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(f"peer package {module!r} is not installed (bootstrap installs it with "
                                  f"pip --no-deps): {exc}") from None
    return functools.partial(getattr(mod, cls), **dict(overrides))


def build(model_name: str, batch: int, device: str, spec: Spec) -> Tuple[Callable[[], object], int]:
    """(one training step on a fixed minibatch, the period of its cost in steps)."""
    from natasha_ext import cli_optimizers, models

    torch.manual_seed(0)
    model = models.get_model(model_name, in_channels=1, image_size=28).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    params = list(model.parameters())
    loss = lambda: F.cross_entropy(model(x), y)
    if spec.kind == "peer":
        opt = _peer(spec.label)(params)

        def step():  # the peers' protocol: the graph of the gradient is kept for their HVP
            opt.zero_grad()
            loss().backward(create_graph=True)
            opt.step()
        return step, 1
    name, overrides = VARIANTS.get(spec.label, (spec.label, ()))
    cli = cli_optimizers.get_spec(name)
    hp = _hyperparameters(name, device, overrides)
    opt = cli.build(model, params, hp)
    if spec.path in ("fused", "reference"):
        if spec.path == "fused" and not ops.fused_available(device):
            raise RuntimeError(f"{spec.label}: the fused kernels are not available on {device}")
        opt.fused = spec.path == "fused"
    period = cost_period(name, hp)
    if cli.closure == "loss":
        one = lambda: opt.step(loss)
    else:
        def closure():
            opt.zero_grad()
            out = loss()
            out.backward()
            return out
        one = lambda: opt.step(closure)
    if name in CYCLES:
        return _whole_cycle(one, functools.partial(CYCLES[name], opt)), 1
    return one, period


def _whole_cycle(one: Callable[[], object], at_cycle_start: Callable[[], bool]) -> Callable[[], CycleSteps]:
    """A step function that runs optimizer steps until the next cycle starts (at least one)."""
    def cycle():
        n = 0
        while True:
            one()
            n += 1
            if at_cycle_start():
                return CycleSteps(n)
    return cycle


def build_step(model_name: str, batch: int, device: str, spec: Spec) -> Callable[[], object]:
    """The step alone (what memory_probe builds in its fresh process)."""
    return build(model_name, batch, device, spec)[0]


def fused_vs_reference(fused: Sequence[float], ref: Sequence[float], tol: float = FUSED_TOL) -> Tuple[float, bool]:
    """(fused median / reference median, flag): the flag is set when the fused path was slower in
    every one of at least MIN_ROUNDS paired rounds and the ratio exceeds 1 + tol."""
    if not fused or not ref:
        return float("nan"), False
    ratio = statistics.median(fused) / statistics.median(ref)
    paired = list(zip(fused, ref))
    every_round = len(paired) >= MIN_ROUNDS and all(f > r for f, r in paired)
    return ratio, bool(every_round and ratio > 1 + tol)



def time_rows(device: str, model_name: str, batch: int, threads: int, rows: List[Spec], rounds: int,
              sample_s: float) -> List[Dict]:
    torch.set_num_threads(threads)
    steps, periods, errors = {}, {}, {}
    for spec in rows:
        key = (spec.label, spec.path)
        try:
            step, period = build(model_name, batch, device, spec)
            step()  # lazy state, first inverses; interleaved() then calibrates on a second step
            steps[key], periods[key] = step, period
        except Exception as exc:  # a peer not installed, no kernels, an optimizer that fails here
            errors[key] = error_text(exc)
    with tqdm(total=len(steps) * (rounds + 1), desc=f"e2e {model_name} {threads} thr", unit="sample",
              dynamic_ncols=True, leave=False) as bar:
        samples = interleaved(steps, device, rounds, sample_s, periods,
                              on_sample=lambda key: (bar.set_postfix_str(f"{key[0]} ({key[1]})"), bar.update()))
    out = []
    for spec in rows:
        key = (spec.label, spec.path)
        st = summarize(samples.get(key, []))
        out.append({"device": device, "model": model_name, "batch": batch, "threads": threads,
                    "optimizer": spec.label, "kind": spec.kind, "path": spec.path, "period": periods.get(key, 0),
                    "rounds": len(samples.get(key, [])), "ms": st["median"] * 1e3, "ms_min": st["min"] * 1e3,
                    "ms_max": st["max"] * 1e3, "spread": st["spread"], "error": errors.get(key, ""),
                    "samples": samples.get(key, [])})
    derive(out)
    return out


def derive(rows: List[Dict]) -> None:
    """x SGD, fused/ref and its flag, x best peer (our AdaHessian rows against the faster of the
    peers with the same curvature schedule), per (device, model, threads)."""
    def key(r):
        return r["device"], r["model"], r["threads"]
    sgd = {key(r): r["ms"] for r in rows if r["optimizer"] == "sgd"}
    peers = {}  # (key, our label) -> fastest peer's ms
    for r in rows:
        if r["kind"] == "peer" and r["optimizer"] in PEERS and r["ms"] == r["ms"]:
            for ours in PEERS[r["optimizer"]][3]:
                k = (key(r), ours)
                peers[k] = min(peers.get(k, float("inf")), r["ms"])
    by_label = {(key(r), r["optimizer"], r["path"]): r for r in rows}
    for r in rows:
        r["x_sgd"] = r["ms"] / sgd.get(key(r), float("nan"))
        best = peers.get((key(r), r["optimizer"])) if r["kind"] == "ours" else None
        r["x_best_peer"] = r["ms"] / best if best else float("nan")
        r["fused_over_ref"], r["fused_slower"] = float("nan"), False
    for r in rows:
        if r["path"] == "fused":
            ref = by_label.get((key(r), r["optimizer"], "reference"))
            if ref is not None:
                ratio, flag = fused_vs_reference(r["samples"], ref["samples"])
                r["fused_over_ref"], r["fused_slower"] = ratio, flag
                ref["fused_over_ref"], ref["fused_slower"] = ratio, flag


def memory_rows(device: str, model_name: str, batch: int, threads: int, rows: List[Spec], early: int,
                late: int) -> Dict[str, Dict]:
    """label -> memory_probe's result (or {'error': ...}) for the MEMORY_ROWS among ``rows``."""
    out = {}
    for spec in rows:
        if spec.label not in MEMORY_ROWS or spec.path == "reference":
            continue
        try:
            out[spec.label] = memory_probe(functools.partial(build_step, model_name, batch, device, spec), device,
                                           threads, early, late)
        except Exception as exc:
            out[spec.label] = {"error": error_text(exc)}
    return out


def run_e2e(devices: List[str], threads: Sequence[int], rounds: int, sample_s: float, models: Optional[Sequence[str]] = None,
            only: Optional[Sequence[str]] = None, memory: bool = True, early: int = 10, late: int = 200,
            progress: Callable[[str], None] = print) -> List[Dict]:
    """Rows of every (device, model, threads); memory columns on the first thread count's rows."""
    rows_spec = specs(only)
    before = torch.get_num_threads()
    out = []
    try:
        for device in devices:
            configs = CONFIGS[device]
            if models:
                unknown = set(models) - set(configs)
                if unknown:
                    raise ValueError(f"--e2e-models: {sorted(unknown)} not benchmarked on {device}; known: {sorted(configs)}")
            for model_name, batch in configs.items():
                if models and model_name not in models:
                    continue
                for i, n in enumerate(threads):
                    progress(f"end to end: {device} {model_name} batch {batch}, {n} thread(s), {len(rows_spec)} rows")
                    rows = time_rows(device, model_name, batch, n, rows_spec, rounds, sample_s)
                    mem = memory_rows(device, model_name, batch, n, rows_spec, early, late) if memory and i == 0 else {}
                    for r in rows:
                        m = mem.get(r["optimizer"]) if r["path"] != "reference" else None
                        r.update({"peak_MB": float("nan"), "growth_MB": float("nan"), "leak": None, "mem_method": "",
                                  "mem_steps": f"{early}->{late}" if m else ""})
                        if m and "error" in m:
                            r["error"] = r["error"] or f"memory: {m['error']}"
                        elif m:
                            r.update(peak_MB=m["peak_MB"], growth_MB=m["growth_MB"], leak=m["leak"],
                                     mem_method=m["method"])
                    out += rows
    finally:
        torch.set_num_threads(before)
    for r in out:
        r.pop("samples")
    return out


def _cell(x: float, fmt: str) -> str:
    return format(x, fmt) if x == x else "-"


def table_lines(rows: List[Dict]) -> List[str]:
    hdr = (f"{'model':8} {'thr':>3} {'optimizer':44} {'path':9} {'ms/step':>9} {'min':>9} {'max':>9} {'spread':>6} "
           f"{'x SGD':>6} {'fused/ref':>9} {'x peer':>6} {'peak MB':>8} {'growth':>7} {'leak':>4}")
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        leak = "" if r.get("leak") is None else ("LEAK" if r["leak"] else "no")
        flag = " SLOWER" if r["fused_slower"] and r["path"] == "fused" else ""
        lines.append(f"{r['model']:8} {r['threads']:3d} {r['optimizer']:44} {r['path']:9} {_cell(r['ms'], '9.2f')} "
                     f"{_cell(r['ms_min'], '9.2f')} {_cell(r['ms_max'], '9.2f')} {_cell(100 * r['spread'], '5.0f')}% "
                     f"{_cell(r['x_sgd'], '6.2f')} {_cell(r['fused_over_ref'], '9.2f')} {_cell(r['x_best_peer'], '6.2f')} "
                     f"{_cell(r.get('peak_MB', float('nan')), '8.1f')} {_cell(r.get('growth_MB', float('nan')), '7.1f')} "
                     f"{leak:>4}{flag}" + (" !" if r["spread"] > SPREAD_TOL else "")
                     + (f"  ({r['error']})" if r["error"] else ""))
    methods = sorted({r["mem_method"] for r in rows if r.get("mem_method")})
    lines.append(f"fused/ref: fused median / reference median; SLOWER: fused slower in every round and by > "
                 f"{100 * FUSED_TOL:.0f} %. '!': spread (max - min) / median > {100 * SPREAD_TOL:.0f} %. x peer: time / the "
                 f"faster AdaHessian peer with the same curvature schedule. Memory ({', '.join(methods) or 'not measured'}), "
                 f"fresh process per row: peak above the memory before the first step; growth: memory after step "
                 f"{next((r['mem_steps'] for r in rows if r.get('mem_steps')), '-')} (leak: growth > "
                 f"max({LEAK_TOL_MB:g} MB, {100 * LEAK_TOL_REL:g} % of peak))")
    return lines


def print_e2e(rows: List[Dict]) -> None:
    print("\n".join(table_lines(rows)))


def markdown(rows: List[Dict]) -> str:
    """The summary.md section: the same columns as the printed table."""
    out = ["### End to end: one training step on a fixed minibatch (fused beside reference)", "",
           "| device | model | batch | threads | optimizer | path | ms/step (min–max) | × SGD | fused/ref | × best peer "
           "| peak MB | growth MB | leak | error |",
           "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        leak = "" if r.get("leak") is None else ("**yes**" if r["leak"] else "no")
        ratio = _cell(r["fused_over_ref"], ".2f") + (" **slower**" if r["fused_slower"] else "")
        out.append(f"| {r['device']} | {r['model']} | {r['batch']} | {r['threads']} | {r['optimizer']} | {r['path']} | "
                   f"{_cell(r['ms'], '.2f')} ({_cell(r['ms_min'], '.2f')}–{_cell(r['ms_max'], '.2f')}) | "
                   f"{_cell(r['x_sgd'], '.2f')} | {ratio} | {_cell(r['x_best_peer'], '.2f')} | "
                   f"{_cell(r.get('peak_MB', float('nan')), '.1f')} | {_cell(r.get('growth_MB', float('nan')), '.1f')} | "
                   f"{leak} | {r['error']} |")
    out += ["", table_lines(rows)[-1] if rows else ""]
    return "\n".join(out)
