"""The self-test's outputs: a table for people (one row per check x device x dtype) and JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Sequence, Tuple

from natasha_ext.selftest.compare import Result

SCHEMA = 1


def _ratio(r: Result) -> float:
    if r.skipped:
        return -2.0
    if not r.passed:
        return math.inf
    if r.max_error is None or not r.tolerance:
        return -1.0 if not r.max_error else math.inf
    return r.max_error / r.tolerance


def table_rows(results: Sequence[Result]) -> List[Tuple[Result, int, List[Result]]]:
    """(worst result, number of variants, failed variants) per (check, name, device, dtype), in
    the order the checks ran."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        groups.setdefault((r.check, r.name, r.device, r.dtype), []).append(r)
    return [(max(rs, key=_ratio), len(rs), [r for r in rs if not r.passed]) for rs in groups.values()]


def _num(x) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else ("inf" if x == math.inf else f"{x:.2e}")


def format_table(results: Sequence[Result]) -> str:
    rows = table_rows(results)
    name_w = max([len("check")] + [len(f"{w.check} {w.name}") for w, _, _ in rows])
    head = f"{'check':{name_w}}  {'device':6}  {'dtype':8}  {'max error':>9}  {'tolerance':>9}  {'result':6}  variants"
    lines = [head, "-" * len(head)]
    for worst, n, failed in rows:
        status = "FAIL" if failed else worst.status
        lines.append(f"{worst.check + ' ' + worst.name:{name_w}}  {worst.device:6}  {worst.dtype:8}  "
                     f"{_num(worst.max_error):>9}  {_num(worst.tolerance):>9}  {status:6}  {n}")
        for r in failed:
            lines.append(f"    {r.variant}: {r.message}")
        if worst.skipped:
            lines.append(f"    {worst.variant}: {worst.message}")
    return "\n".join(lines)


def summary(results: Sequence[Result], seconds: float) -> dict:
    failed = [r for r in results if not r.passed]
    return {"checks": len(results), "passed": sum(r.passed and not r.skipped for r in results),
            "failed": len(failed), "skipped": sum(r.skipped for r in results), "seconds": round(seconds, 2),
            "ok": not failed and any(not r.skipped for r in results)}


def to_json(env: dict, options: dict, results: Sequence[Result], seconds: float) -> str:
    def clean(x):
        return None if isinstance(x, float) and not math.isfinite(x) else x

    rows = [{k: clean(v) for k, v in dataclasses.asdict(r).items()} | {"status": r.status} for r in results]
    return json.dumps({"schema": SCHEMA, "summary": summary(results, seconds), "options": options,
                       "environment": env, "results": rows}, indent=1, allow_nan=False)
