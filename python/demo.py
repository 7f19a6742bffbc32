"""README command 1's real run: a few minutes of CPU training on real MNIST comparing SGD with
every optimizer registered in natasha_ext.cli_optimizers (each with its paper defaults),
printing the mean ± std summary table and writing results/demo/curves.png.

    python python/demo.py                                   # all registered optimizers
    python python/demo.py --optimizer sgd adam --epochs 3   # any train flag overrides the demo's

Setting: LeNet-5, class-balanced 2000/500/1000 MNIST subset, 5 epochs of batch 50, seeds 0 and 1
(same initial weights and minibatch order for every optimizer), one CPU thread. See
``python -m natasha_ext.train --help`` for every flag.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natasha_ext import train  # noqa: E402

DEMO = ["--dataset", "mnist", "--model", "lenet5", "--subset", "2000/500/1000", "--epochs", "5",
        "--batch-size", "50", "--seeds", "0,1", "--optimizer", "all", "--out", os.path.join("results", "demo"),
        "--no-progress", "--threads", "1"]   # one thread: small convnets gain nothing from more, and a
#                                           busy machine makes multi-threaded torch stall


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return train.main(DEMO + argv)        # argparse: later flags win, so user flags override the demo's


if __name__ == "__main__":
    sys.exit(main())
