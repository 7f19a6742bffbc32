"""Rows for the foundation ops: rademacher_ and global_norm.

rademacher_ has no foreach form: its unfused baseline is torch's own generator
(bernoulli_, not counter-based, not reproducible across devices) eager and compiled.
global_norm's foreach form (torch._foreach_norm) makes no list-sized temporaries, so its warm
and cold rows run the same code.
"""
import torch

from benchmarks.common import Case
from benchmarks.variants import compiled_case, op_cases
from natasha_ext import ops
from natasha_ext.ops import reference

SEED = 1234


def _bernoulli(ts):
    return lambda: [t.bernoulli_(0.5).mul_(2).sub_(1) for t in ts]


def cases():
    out = [Case("rademacher_", "fused", 4, lambda ts: lambda: ops.rademacher_(ts, SEED, 0, fused=True), role="fused"),
           Case("rademacher_", "torch-bernoulli", 4, _bernoulli, role="baseline"),
           compiled_case("rademacher_", 4, _bernoulli),
           Case("rademacher_", "per-tensor", 4, lambda ts: lambda: reference.rademacher_(ts, SEED, 0))]
    out += op_cases("global_norm", 4, lambda ts: ts,
                    fused=lambda ts: ops.global_norm(ts, fused=True),
                    form=lambda ts, temps: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts))),
                    reference=reference.global_norm)
    return out
