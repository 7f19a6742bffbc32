"""The rows every op gets, built from one fused call, one foreach form and one reference.

fused         the op's kernel.
foreach-cold  the foreach form as eager PyTorch code runs it: every temporary it creates with
              torch._foreach_OP(a, ...) is a fresh allocation on each call (on CPU the pages of a
              large one are faulted in anew, since the allocator hands big blocks back to the OS;
              on CUDA torch's caching allocator reuses its blocks, so cold pays only bookkeeping).
foreach-warm  the same form with every temporary allocated once, on the first (warm-up) call,
              and reused: it is filled by torch._foreach_copy_(buf, a) and the in-place
              torch._foreach_OP_(buf, ...). No allocation happens inside the timed call, at the
              price of one more read and write of each temporary (the foreach API has no out= that
              avoids both: its *_out overloads allocate and copy).
compiled      torch.compile(fullgraph=True) of the cold form (inductor removes the temporaries
              itself); compiling and two warm-up calls happen before timing, and a form that does
              not compile becomes an error cell of this row.
per-tensor    natasha_ext.ops.reference: the plain loop over tensors the kernels are tested against.

The op's headline compares fused with best_unfused, the fastest of its 'baseline' rows
(foreach-warm, foreach-cold, compiled; the reference for ops without a foreach form).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from benchmarks.common import Case


class Temps:
    """Where a foreach form gets its list-sized temporaries: fresh per call (cold) or one list per
    temporary, allocated on the first call and reused on every later one (warm)."""

    def __init__(self, warm: bool = False):
        self.warm = warm
        self._bufs: List[List[torch.Tensor]] = []
        self._next = 0

    def new(self, op: str, first: List[torch.Tensor], *rest, **kwargs) -> List[torch.Tensor]:
        """torch._foreach_<op>(first, *rest, **kwargs), written into a reused list when warm."""
        if not self.warm:
            return getattr(torch, f"_foreach_{op}")(first, *rest, **kwargs)
        if self._next == len(self._bufs):
            self._bufs.append([torch.empty_like(t) for t in first])
        buf = self._bufs[self._next]
        self._next += 1
        torch._foreach_copy_(buf, first)
        getattr(torch, f"_foreach_{op}_")(buf, *rest, **kwargs)
        return buf

    def bind(self, call: Callable[[], object]) -> Callable[[], object]:
        """``call`` made to start from the first buffer on every invocation."""
        def run():
            self._next = 0
            return call()
        return run


COLD = Temps(warm=False)  # stateless: every foreach form's default


def compile_call(call: Callable[[], object]) -> Callable[[], object]:
    """torch.compile(fullgraph=True) of a zero-argument call. The dynamo cache is reset first:
    every op's call shares a code object with its siblings (the lambdas below), and a cache
    holding all of them would add their guard checks to each timed call."""
    torch._dynamo.reset()
    return torch.compile(call, fullgraph=True)


def compiled_case(op: str, bytes_per_param: int, setup: Callable, **kwargs) -> Case:
    """The 'compiled' row of the unfused call that ``setup(ts)`` returns."""
    return Case(op, "compiled", bytes_per_param, lambda ts: compile_call(setup(ts)), role="baseline", **kwargs)


def op_cases(op: str, bytes_per_param: int, inputs: Callable[[List[torch.Tensor]], Dict],
             fused: Callable[[Dict], object], form: Callable[[Dict, Temps], object],
             reference: Callable[[Dict], object], **kwargs) -> List[Case]:
    """fused, foreach-warm, foreach-cold, compiled and per-tensor rows of one op.

    inputs(ts) builds the op's tensors from the parameter list (once per row, outside the timed
    call); fused(i), form(i, temps) and reference(i) run one step on them.
    """
    def bound(run):
        return lambda ts: (lambda i: lambda: run(i))(inputs(ts))

    def foreach(warm):
        def setup(ts):
            i, temps = inputs(ts), Temps(warm)
            return temps.bind(lambda: form(i, temps))
        return setup

    return [Case(op, "fused", bytes_per_param, bound(fused), role="fused", **kwargs),
            Case(op, "foreach-warm", bytes_per_param, foreach(True), role="baseline", **kwargs),
            Case(op, "foreach-cold", bytes_per_param, foreach(False), role="baseline", **kwargs),
            compiled_case(op, bytes_per_param, bound(lambda i: form(i, COLD)), **kwargs),
            Case(op, "per-tensor", bytes_per_param, bound(reference), **kwargs)]
