"""README command 1's real run: a few minutes of CPU training on real MNIST comparing SGD with
every optimizer registered in natasha_ext.cli_optimizers, each at its *tuned* setting when a
tuned table exists, printing the mean ± std summary table and writing results/demo/curves.png.

    python python/demo.py                                   # all registered optimizers
    python python/demo.py --optimizer sgd adam --epochs 3   # any train flag overrides the demo's

Setting: LeNet-5, class-balanced 2000/500/1000 MNIST subset, 5 epochs of batch 50, seeds 0 and 1
(same initial weights and minibatch order for every optimizer), one CPU thread. See
``python -m natasha_ext.train --help`` for every flag.

Hyperparameters: python/tuned_lenet5_mnist.json, the learning-rate-like value of each optimizer
selected by ``python python/compare.py --write-tuned python/tuned_lenet5_mnist.json`` on LeNet-5 /
MNIST (its "setting" field says on which sizes). Without that file every optimizer runs at its
CLI default, and the demo says so; a malformed file is an error naming it (exit 2). A flag given
on the command line (e.g. ``--lr``) overrides the table for every optimizer that has it.
"""
import os
import sys
from pathlib import Path

from natasha_ext.training import TrainConfig, main as train_main
from natasha_ext.training.tuning import TunedTableError, as_per_optimizer, read_tuned

TUNED = Path(__file__).resolve().parent / "tuned_lenet5_mnist.json"


def demo_config(tuned: dict) -> TrainConfig:
    # one thread: small convnets gain nothing from more, and a busy machine makes multi-threaded torch stall
    return TrainConfig(dataset="mnist", model="lenet5", subset="2000/500/1000", epochs=5, batch_size=50,
                       seeds=[0, 1], optimizers=["all"], out=os.path.join("results", "demo"), progress=False,
                       threads=1, per_optimizer=as_per_optimizer(tuned))


def load_table(path: Path):
    """The tuned table and the line saying where the hyperparameters come from."""
    if not path.exists():
        return None, (f"hyperparameters: each optimizer's CLI default -- no tuned table at {path} yet "
                      "(make one with: python python/compare.py --write-tuned " + str(path) + ")")
    doc = read_tuned(path)
    return doc, (f"hyperparameters: tuned values from {path} (problem {doc['problem']}: {doc['setting']}; "
                 f"made by `{doc['source']}`) for {', '.join(sorted(doc['optimizers']))}; others at their defaults")


def main(argv=None, tuned_path: Path = TUNED) -> int:
    try:
        doc, line = load_table(Path(tuned_path))
    except TunedTableError as e:
        print(f"python/demo.py: error: {e}", file=sys.stderr)
        return 2
    print(line, flush=True)
    return train_main(argv, defaults=demo_config(doc))   # the demo's settings are the defaults; flags override them


if __name__ == "__main__":
    sys.exit(main())
