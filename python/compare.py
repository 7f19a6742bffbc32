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

* ``lenet5-mnist``: LeNet-5, MNIST 2000/500/1000, 4 epochs of batch 50 (160 steps), target 90 %;
* ``lenet5-fashion``: LeNet-5, Fashion-MNIST 2000/500/1000, 4 epochs of batch 50, target 70 %;
* ``mlp-mnist``: MLP 784-128-10, MNIST 4000/500/1000, 4 epochs of batch 50 (320 steps), target 90 %.

Time budget of the default run (12 optimizers x (5 grid points + 3 seeds) = 96 runs per problem,
one thread). Measured process CPU time per training step (batch 50, one thread; CPU time stands
for the wall time of a quiet machine: the measuring machine was shared, load average 8-12 on its
2 cores, where wall times were 4-8x longer):

    ms/step   sgd  sgd-mom adam adahess hybrid nat1.5 nat2  kfac  ang  ifang  TR   ARC   sum
    LeNet-5   1.5  2.5     2    15      4      8      40    7.5   7.5  6.5    21   137   253
    MLP       1.2  2       2    3.5     3.2    2.5    4.7   7.2   7.7  3.2    4.7  20.5   63

    one evaluation of train/val/test (after every epoch and before training): LeNet-5 0.22 s per
    2500 images (0.31 s for 2000/500/1000), MLP 0.01 s

    LeNet-5 problem: 8 x (160 steps x 0.253 s + 12 x 5 evaluations x 0.31 s) = 8 x 59 s = 473 s
    two LeNet-5 problems: 946 s
    MLP problem:     8 x (320 steps x 0.063 s + 12 x 5 x 0.02 s) = 8 x 21 s = 170 s
    total ~1120 s = 19 min of CPU (+ setup), under the 30-minute budget with ~35 % margin for
    ARC / Natasha2 steps that cost more later in training (ARC's Krylov iterations vary: 5-7
    HVPs per step measured over 80 LeNet-5 steps, 11 in the first ones).

Calibration (lenet5-mnist at 1000/500/1000, 4 epochs, sgd / natasha2 / arc x 5 grid points + 1
seed, on the loaded machine): 458 s wall for the 18 runs; training seconds per run: sgd 1.5-3.1,
natasha2 7-16, arc 36-53. results.json records the wall and CPU seconds of every run.

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
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (one, as the demo: these small models gain little from more, and a "
                        "shared machine stalls multi-threaded torch; the time estimate assumes it)")
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
