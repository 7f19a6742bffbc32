"""Hyperparameter checks with errors that name the argument."""
from __future__ import annotations

import math


def _num(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if hasattr(value, "item") and getattr(value, "numel", lambda: 2)() == 1:  # 0-dim tensor lr
            value = value.item()
        else:
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def positive(name: str, value, allow_zero: bool = False):
    v = _num(name, value)
    if v < 0 or (v == 0 and not allow_zero) or math.isinf(v):
        raise ValueError(f"invalid {name}: {value!r} (must be {'>= 0' if allow_zero else '> 0'} and finite)")
    return value


def nonnegative(name: str, value):
    return positive(name, value, allow_zero=True)


def in_range(name: str, value, low: float, high: float, low_open=False, high_open=True):
    v = _num(name, value)
    ok = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not ok:
        lb, hb = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"invalid {name}: {value!r} (must be in {lb}{low}, {high}{hb})")
    return value


def greater_than(name: str, value, bound: float):
    v = _num(name, value)
    if not v > bound or math.isinf(v):
        raise ValueError(f"invalid {name}: {value!r} (must be > {bound} and finite)")
    return value


def positive_int(name: str, value, allow_zero: bool = False):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"invalid {name}: {value!r} (must be {'>= 0' if allow_zero else '> 0'})")
    return value


def choice(name: str, value, options):
    if value not in options:
        raise ValueError(f"invalid {name}: {value!r} (must be one of {tuple(options)})")
    return value


def betas(value, name: str = "betas"):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"invalid {name}: {value!r} (must be a pair)")
    in_range(f"{name}[0]", value[0], 0.0, 1.0)
    in_range(f"{name}[1]", value[1], 0.0, 1.0)
    return tuple(value)
