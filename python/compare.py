"""Which optimizer, when: a tuned, seeded comparison of every registered optimizer on three
problems (the DeepOBS protocol: Schneider, Balles and Hennig, "DeepOBS: A deep learning
optimizer benchmark suite", ICLR 2019).

    python python/compare.py                                   # all 12 optimizers x 3 problems (CPU)
    python python/compare.py --full --device cuda              # the larger GPU setting
    python python/compare.py --problems lenet5-mnist --optimizers sgd,adam,natasha15 --seeds 1,2,3
    python python/compare.py --out reports/compare --write-tuned python/tuned_lenet5_mnist.json

Per problem and optimizer: the learning-rate-like flag (``lr``; the initial radius Delta_0 of
``trust-region`` and the initial sigma_0 of ``arc``, which both adapt afterwards; ``sgd_lr`` of the
Hybrid with its AdaHessian ``lr`` scaled alike) is tuned on a log grid of ``--grid-points`` values
spanning ``--span`` decades centred on the CLI default, with one seed (``--tune-seed``), on the
validation split; selection: best validation accuracy at the end, ties -> lower validation loss.
A grid point whose loss goes non-finite (or whose optimizer fails numerically) is recorded as
diverged and ranks last. The selected setting then trains with ``--seeds`` (fresh: not the tuning
seed); the report gives final test accuracy and loss (mean ± std), training time, gradient and
HVP counts, and the cost to a target validation accuracy. Outputs (in ``--out``, written as runs
finish): history.csv, tuning.csv, final.csv, kicks.csv, results.json, tuning-<problem>.png and
summary.md (with the Natasha section: Natasha1.5/Natasha2 against SGD and SGD-momentum at an
equal gradient budget, and Natasha2's kicks with the loss before/after each).

Problems (short CPU setting; ``--full``: all training images but 5000 for validation, the whole
test set, 10 epochs of batch 128):

* ``lenet5-mnist``: LeNet-5, MNIST 1000/500/1000, 4 epochs of batch 50 (80 steps), target 90 %;
* ``lenet5-fashion``: LeNet-5, Fashion-MNIST 1000/500/1000, 4 epochs of batch 50, target 70 %;
* ``mlp-mnist``: MLP 784-128-10, MNIST 2000/500/1000, 4 epochs of batch 50 (160 steps), target 88 %.

Time budget of the default run (12 optimizers, 5 grid points + 3 seeds = 8 runs each, 96 runs
per problem). Measured training time per step, one thread, batch 50, on this 2-core machine
while ~8 other processes shared it (load average 8; summed over the 12 optimizers, one step
each; ARC (~11 HVPs per step) is half of it, Natasha2's Oja phase and AdaHessian's HVP most of
the rest):

    LeNet-5:  ~0.80 s per "one step of each of the 12 optimizers"
    MLP:      ~0.15 s

    LeNet-5 problems: 2 problems x 8 runs x 80 steps x 0.80 s = 1024 s
    MLP problem:      1 problem  x 8 runs x 160 steps x 0.15 s = 192 s
    evaluation (train/val/test subsets after every epoch, 288 runs x 5 evaluations): ~150 s
    total on the loaded machine: ~1370 s (23 min); a quiet 2-core machine is faster still.

See the calibration numbers in reports/compare/ (the committed run) for the measured totals.
The tuned table (``--write-tuned PATH``) holds the selected settings of lenet5-mnist; the README
demo (python/demo.py) reads python/tuned_lenet5_mnist.json when it exists.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from natasha_ext import cli_optimizers, data
from natasha_ext.training import compare as C
from natasha_ext.training.config import parse_seeds

PROG = "python python/compare.py"


def _names(text: str, known, what: str):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(known)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{what} must be 'all' or a comma list of {', '.join(known)}; "
                                         f"got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=lambda t: _names(t, C.PROBLEMS, "--problems"), default=list(C.PROBLEMS),
                   help="comma list of problems (default: all)")
    p.add_argument("--optimizers", type=lambda t: _names(t, cli_optimizers.OPTIMIZERS, "--optimizers"),
                   default=list(cli_optimizers.OPTIMIZERS), help="comma list of registered optimizers (default: all)")
    p.add_argument("--grid-points", type=int, default=5, help="log-grid values per optimizer")
    p.add_argument("--span", type=float, default=3.0, help="decades the grid spans, centred on the CLI default")
    p.add_argument("--tune-seed", type=int, default=0, help="the one seed of the tuning runs")
    p.add_argument("--seeds", type=parse_seeds, default=[1, 2, 3], help="fresh seeds of the final runs")
    p.add_argument("--full", action="store_true", help="the larger (GPU) setting: whole datasets, 10 epochs")
    p.add_argument("--subset", default=None, help="TRAIN/VAL/TEST for every problem (overrides the default)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every problem (overrides the default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="results/compare", help="results folder")
    p.add_argument("--write-tuned", default=None, metavar="PATH",
                   help="write lenet5-mnist's selected settings as the demo's tuned table")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="tuning-curve PNGs")
    return p


def parse(argv=None) -> "tuple[C.CompareSettings, argparse.Namespace]":
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.write_tuned and "lenet5-mnist" not in a.problems:
        parser.error("argument --write-tuned: the tuned table is lenet5-mnist's; add it to --problems")
    if a.epochs is not None and a.epochs < 1:
        parser.error(f"argument --epochs: must be >= 1, got {a.epochs}")
    if a.threads is not None and a.threads < 1:
        parser.error(f"argument --threads: must be >= 1, got {a.threads}")
    checks = [("--grid-points", lambda: C.tuning.grid("sgd", a.grid_points, 0.0)),
              ("--span", lambda: C.tuning.grid("sgd", 1, a.span)),
              ("--subset", lambda: a.subset and [data.subset_sizes(C.PROBLEMS[p].dataset, a.subset)
                                                 for p in a.problems])]
    for flag, check in checks:
        try:
            check()
        except ValueError as e:
            parser.error(f"argument {flag}: {e}")
    if a.tune_seed in a.seeds:
        parser.error(f"argument --seeds: the final seeds must be fresh, not the tuning seed {a.tune_seed}")
    if a.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            parser.error("argument --device: cuda was asked for but torch.cuda.is_available() is False")
    settings = C.CompareSettings(problems=a.problems, optimizers=a.optimizers, grid_points=a.grid_points, span=a.span,
                                 tune_seed=a.tune_seed, seeds=a.seeds, full=a.full, subset=a.subset, epochs=a.epochs,
                                 device=a.device, threads=a.threads, out=a.out, progress=a.progress, plot=a.plot)
    return settings, a


def main(argv=None) -> int:
    settings, a = parse(argv)
    command = PROG + " " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    try:
        doc = C.run_compare(settings, write_tuned=a.write_tuned, command=command.strip())
    except C.Interrupted as e:
        print(f"\ninterrupted: {e.runs} finished runs and their summary are in {e.out}/ (summary.md, tuning.csv, "
              "final.csv, history.csv, results.json)", file=sys.stderr)
        return 130
    except (data.DatasetNotFoundError, data.DatasetCorruptError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(doc['tuning'])} tuning + {len(doc['final'])} final runs; report in {settings.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
