"""``python -m natasha_ext.train`` and the ``natasha-train`` console script: the training CLI.

The program lives in :mod:`natasha_ext.training` (config, loop, runner, outputs, cli); this
module keeps the command and the old import path (``from natasha_ext import train``) working.
"""
import sys

from natasha_ext.training import *  # noqa: F401,F403  (the old import path)
from natasha_ext.training import __all__  # noqa: F401
from natasha_ext.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
