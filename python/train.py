"""Training program (thin wrapper): see ``python -m natasha_ext.train --help``.

    python python/train.py --optimizer sgd sgd-momentum adam --model lenet5 --epochs 5 --seeds 0-2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natasha_ext.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
