"""Reference rows: torch.optim.Adam's step on the same parameter list, fused=True and
foreach=True, so that effective GB/s can be compared across ops (the ops' rows count the same
minimal traffic). Adam in fp32 reads p, g, m, v and writes p, m, v: 28 B/param.
"""
import torch

from benchmarks.common import Case

OP = "adam (torch.optim)"


def _adam(kind):
    def setup(ts):
        params = [t.requires_grad_() for t in ts]
        for p in params:
            p.grad = torch.randn_like(p)
        # lr small so that repeated timing keeps the parameters where they started
        opt = torch.optim.Adam(params, lr=1e-6, fused=kind == "fused", foreach=kind == "foreach")
        return opt.step
    return setup


def cases():
    return [Case(OP, "torch-fused", 28, _adam("fused"), role="fused", note="reference row: torch's own fused Adam"),
            Case(OP, "torch-foreach", 28, _adam("foreach"), role="baseline", note="reference row")]
