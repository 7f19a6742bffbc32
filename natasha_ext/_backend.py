"""Loading of the compiled kernels (natasha_ext._C) and the choice between fused and reference.

The package works without the compiled extension: every op then runs its pure-PyTorch
reference and one warning says why. ``NATASHA_EXT_BACKEND=reference|fused`` forces a path
(``fused`` raises when the kernels are missing); ``NATASHA_EXT_LIBRARY=/path/to/_C.so`` loads a
library built elsewhere instead of ``natasha_ext._C`` (useful for side-by-side builds).
"""
from __future__ import annotations

import os
import warnings

import torch

_BACKEND = os.environ.get("NATASHA_EXT_BACKEND", "auto").strip().lower() or "auto"
if _BACKEND not in ("auto", "reference", "fused"):
    raise ValueError(f"NATASHA_EXT_BACKEND must be 'auto', 'reference' or 'fused', got {_BACKEND!r}")

LOAD_ERROR: str | None = None
LIBRARY_PATH: str | None = None  # the file the kernels were loaded from


def _load() -> bool:
    global LOAD_ERROR, LIBRARY_PATH
    path = os.environ.get("NATASHA_EXT_LIBRARY")
    try:
        if path:
            torch.ops.load_library(path)
            LIBRARY_PATH = os.path.abspath(path)
        else:
            from natasha_ext import _C  # (registers torch.ops.natasha.*)
            LIBRARY_PATH = _C.__file__
        return True
    except Exception as exc:  # ImportError, OSError (ABI mismatch, missing file)
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        return False


LOADED = _BACKEND != "reference" and _load()
if _BACKEND == "fused" and not LOADED:
    raise ImportError(f"NATASHA_EXT_BACKEND=fused but natasha_ext._C could not be loaded ({LOAD_ERROR})")
if _BACKEND == "auto" and not LOADED:
    warnings.warn(
        "natasha_ext: compiled kernels (natasha_ext._C) not available, using the pure-PyTorch "
        f"reference path ({LOAD_ERROR}). Build them with `pip install --no-build-isolation -e .`.",
        RuntimeWarning, stacklevel=2)


def _has_cuda_kernels() -> bool:
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("natasha::rademacher_", "CUDA")
    except Exception:
        return False


# Device types whose kernels are compiled in; fixed at import so torch.compile sees constants.
FUSED_DEVICES = frozenset((["cpu"] + (["cuda"] if _has_cuda_kernels() else [])) if LOADED else [])
