"""Training program (thin wrapper): see ``python -m natasha_ext.train --help``.

    python python/train.py --optimizer sgd sgd-momentum adam --model lenet5 --epochs 5 --seeds 0-2
"""
import sys

from natasha_ext.training import main

if __name__ == "__main__":
    sys.exit(main())
