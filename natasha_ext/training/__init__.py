"""The training program as a library: real MNIST / Fashion-MNIST, any registered optimizer,
per-epoch metrics, CSV + JSON + PNG, a mean ± std summary over seeds, checkpoints and resume.

* :mod:`~natasha_ext.training.config`: :class:`TrainConfig`, what a run is (checked on creation);
* :mod:`~natasha_ext.training.loop`: :func:`train_one` (one optimizer, one seed), :func:`make_optimizer`;
* :mod:`~natasha_ext.training.runner`: :func:`run` (optimizers x seeds, result folder, resume);
* :mod:`~natasha_ext.training.outputs`, :mod:`~natasha_ext.training.summary`,
  :mod:`~natasha_ext.training.plots`: files, tables, curves;
* :mod:`~natasha_ext.training.cli`: the command line (``python -m natasha_ext.train``);
* :mod:`~natasha_ext.training.compare` (+ :mod:`~natasha_ext.training.compare_report`,
  :mod:`~natasha_ext.training.tuning`, :mod:`~natasha_ext.training.kicks`): the tuned, seeded
  comparison of every optimizer (``python python/compare.py``) and the tuned table the demo reads.

Reproduction programs build a :class:`TrainConfig` and call :func:`train_one` or :func:`run`::

    from natasha_ext.training import TrainConfig, run
    run(TrainConfig(model="lenet5", optimizers=["sgd", "adahessian"], epochs=3, out="results/x"))
"""
from natasha_ext.training.config import ConfigError, TrainConfig, parse_seeds
from natasha_ext.training.loop import EpochContext, evaluate, hyperparameters, make_optimizer, train_one
from natasha_ext.training.outputs import HISTORY_COLUMNS, json_safe, write_csv, write_json
from natasha_ext.training.plots import plot_curves
from natasha_ext.training.runner import Interrupted, run
from natasha_ext.training.summary import format_table, summarize
from natasha_ext.training.cli import build_parser, main, parse_args

__all__ = ["TrainConfig", "ConfigError", "parse_seeds", "EpochContext", "evaluate", "hyperparameters",
           "make_optimizer", "train_one", "HISTORY_COLUMNS", "json_safe", "write_csv", "write_json", "plot_curves",
           "Interrupted", "run", "format_table", "summarize", "build_parser", "main", "parse_args"]
