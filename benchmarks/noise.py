"""When a benchmark run, or one of its rows, is too noisy to quote.

A row is noisy when the spread of its per-round samples, (max - min) / median, exceeds
SPREAD_TOL; the run is noisy when the copy bandwidth measured at its start and at its end
differ by more than COPY_DRIFT_TOL (relative to the lower of the two) on any (device, list), or
when any row is noisy.
"""
from __future__ import annotations

import statistics
from typing import Dict, List, Sequence, Tuple

COPY_DRIFT_TOL = 0.15
SPREAD_TOL = 0.25


def summarize(samples: Sequence[float]) -> Dict[str, float]:
    """min, median, max and spread of a row's samples (NaN for a row without samples)."""
    if not samples:
        nan = float("nan")
        return {"min": nan, "median": nan, "max": nan, "spread": nan}
    lo, med, hi = min(samples), statistics.median(samples), max(samples)
    return {"min": lo, "median": med, "max": hi, "spread": (hi - lo) / med if med > 0 else float("inf")}


def copy_drift(start: float, end: float) -> float:
    return abs(start - end) / min(start, end)


def flag_noise(copy_figures: Dict[str, Tuple[float, float]], rows: List[Dict],
               drift_tol: float = COPY_DRIFT_TOL, spread_tol: float = SPREAD_TOL) -> Tuple[bool, List[str]]:
    """Set every row's 'noisy' and return (run is noisy, the reasons).

    copy_figures: label -> (copy GB/s at the start, at the end); rows carry 'spread' (NaN for an
    error cell, which is never flagged) and the labels the reasons name.
    """
    reasons = []
    for label, (start, end) in copy_figures.items():
        drift = copy_drift(start, end)
        if drift > drift_tol:
            reasons.append(f"copy bandwidth {label}: {start:.1f} GB/s at the start, {end:.1f} at the end "
                           f"({100 * drift:.0f} % > {100 * drift_tol:.0f} %)")
    for r in rows:
        r["noisy"] = bool(r["spread"] > spread_tol)  # NaN compares False
    wide = [f"{r['op']}/{r['variant']}" for r in rows if r["noisy"]]
    if wide:
        reasons.append(f"{len(wide)} of {len(rows)} rows spread (max - min) / median > {100 * spread_tol:.0f} %: "
                       + ", ".join(wide[:6]) + (", ..." if len(wide) > 6 else ""))
    return bool(reasons), reasons
