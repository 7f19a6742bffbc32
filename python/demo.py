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

from natasha_ext.training import TrainConfig, main as train_main

# one thread: small convnets gain nothing from more, and a busy machine makes multi-threaded torch stall
DEMO = TrainConfig(dataset="mnist", model="lenet5", subset="2000/500/1000", epochs=5, batch_size=50, seeds=[0, 1],
                   optimizers=["all"], out=os.path.join("results", "demo"), progress=False, threads=1)


def main(argv=None) -> int:
    return train_main(argv, defaults=DEMO)      # the demo's settings are the defaults; flags override them


if __name__ == "__main__":
    sys.exit(main())
