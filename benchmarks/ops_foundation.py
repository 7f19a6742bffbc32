"""Rows for the foundation ops: rademacher_ and global_norm."""
import torch

from benchmarks.common import Case
from natasha_ext import ops
from natasha_ext.ops import reference


def _rademacher(variant):
    def setup(ts):
        if variant == "fused":
            return lambda: ops.rademacher_(ts, 1234, 0, fused=True)
        if variant == "per-tensor":
            return lambda: reference.rademacher_(ts, 1234, 0)
        # torch's own generator (not counter-based, not reproducible across devices): a peer
        return lambda: [t.bernoulli_(0.5).mul_(2).sub_(1) for t in ts]
    return setup


def _global_norm(variant):
    def setup(ts):
        if variant == "fused":
            return lambda: ops.global_norm(ts, fused=True)
        if variant == "foreach":
            return lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(ts)))
        return lambda: reference.global_norm(ts)
    return setup


def cases():
    out = [Case("rademacher_", v, 4, _rademacher(v)) for v in ("fused", "per-tensor", "torch-bernoulli")]
    out += [Case("global_norm", v, 4, _global_norm(v)) for v in ("fused", "foreach", "per-tensor")]
    return out
