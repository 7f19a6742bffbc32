"""The checkpoint of one (optimizer, seed) run, rewritten atomically after every epoch.

While the run trains it holds the last finished epoch's model, optimizer state, minibatch
generator, torch RNG state, counters and history rows; once the run is finished only the rows
are kept (a sweep of many runs would otherwise keep a copy of every model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from natasha_ext.training.outputs import atomic_write

__all__ = ["RunCheckpoint"]

_VERSION = 1


class RunCheckpoint:
    """``path``: the checkpoint file; ``resume``: whether :meth:`load` may return a saved state
    (a fresh run ignores, then overwrites, whatever is there)."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        self.resume = resume

    def load(self) -> Optional[Dict[str, Any]]:
        """The saved run (``rows``, ``finished`` and, unfinished, the states), or None."""
        if not (self.resume and self.path.is_file()):
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("version") != _VERSION:
            raise RuntimeError(f"{self.path}: checkpoint version {state.get('version')!r}, expected {_VERSION}")
        return state

    def save(self, rows: List[Dict[str, Any]], finished: bool, states: Optional[Dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": _VERSION, "rows": [dict(r) for r in rows], "finished": finished, **(states or {})}
        atomic_write(self.path, lambda tmp: torch.save(doc, tmp))
