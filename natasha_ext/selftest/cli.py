"""``python -m natasha_ext``: the package's diagnosis and self-test.

Prints the versions, the compiled architectures and which natasha:: ops have kernels on which
device, then runs every op on every available device fused against its reference on awkward
inputs (sizes 0, 1, odd, just above a chunk, more than 110 tensors, non-contiguous tensors, every
dtype the op takes), the boundary cases of the chunked kernels, and a few steps of every
optimizer family fused against reference. Exit status 0 when every check passes, 1 otherwise,
2 for a usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

import torch

from natasha_ext import _backend
from natasha_ext.selftest.compare import Result
from natasha_ext.selftest.environment import describe, format_environment
from natasha_ext.selftest.report import format_table, summary, to_json
from natasha_ext.selftest.runner import run_selftest


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m natasha_ext", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="test one device (default: cpu, and cuda when available)")
    ap.add_argument("--quick", action="store_true",
                    help="ops and fp32 optimizer steps only, without the boundary cases (seconds)")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="also write the results as JSON to PATH ('-': JSON alone on stdout, the report on stderr)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for the checks (default 1: the inputs are small, and on a busy "
                         "machine idle-waiting threads cost minutes; the 'repeat' checks compare N threads with 1)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every check as it finishes")
    return ap


def _devices(choice: Optional[str]) -> List[str]:
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise ValueError(f"--device cuda but torch sees no CUDA device (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda})")
    return [choice] if choice else ["cpu"] + (["cuda"] if cuda else [])


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads < 1:
        _parser().error(f"--threads must be >= 1, got {args.threads}")
    if args.json not in (None, "-"):
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            _parser().error(f"--json {args.json}: folder {folder} does not exist or is not writable")
    try:
        devices = _devices(args.device)
    except ValueError as exc:
        print(f"python -m natasha_ext: {exc}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, devices)
    finally:
        torch.set_num_threads(threads)   # main() called as a function leaves torch as it found it


def _run(args: argparse.Namespace, devices: List[str]) -> int:
    out = sys.stderr if args.json == "-" else sys.stdout
    env = describe()
    print(format_environment(env), file=out, flush=True)
    print(f"\nself-test on {', '.join(devices)}{' (quick)' if args.quick else ''} ...", file=out, flush=True)
    t0 = time.perf_counter()

    def progress(r: Result):
        if args.verbose:
            err = "-" if r.max_error is None else f"{r.max_error:.2e}"
            print(f"  {r.status:4} {r.check} {r.name} {r.device} {r.dtype} [{r.variant}] err {err} "
                  f"({r.seconds:.2f} s) {r.message}", file=out, flush=True)

    if _backend.LOADED:
        results = run_selftest(devices, quick=args.quick, on_result=progress)
    else:
        results = [Result("extension", "natasha_ext._C", d, "-", "load", None, None, False,
                          f"compiled kernels not loaded: {_backend.LOAD_ERROR}") for d in devices]
    seconds = time.perf_counter() - t0
    print("\n" + format_table(results), file=out)
    s = summary(results, seconds)
    print(f"\n{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped in {s['seconds']:.1f} s: "
          f"{'OK' if s['ok'] else 'FAILED'}", file=out, flush=True)
    if args.json:
        text = to_json(env, {"devices": devices, "quick": args.quick, "threads": torch.get_num_threads()},
                       results, seconds)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    return 0 if s["ok"] else 1
