"""The package's self-test: every op fused against its reference on awkward inputs, the chunked
kernels' boundary cases, and every optimizer family fused against reference (``python -m
natasha_ext``). Tolerances and their reasons: :mod:`natasha_ext.selftest.tolerances`."""
from natasha_ext.selftest.cli import main
from natasha_ext.selftest.runner import run_selftest

__all__ = ["main", "run_selftest"]
