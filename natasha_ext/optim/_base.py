"""Plumbing shared by every optimizer of the package (a torch.optim.Optimizer subclass).

* ``fused=None|True|False`` resolved once against the compiled kernels.
* A Philox stream (seed, offset) for the optimizer's random draws, kept in ``state_dict``.
* Counters users can log (gradients, HVPs, skipped steps ...), kept in ``state_dict``.
* Parameter checks: sparse gradients, complex parameters, mixed devices/dtypes are refused with
  errors naming the argument.
* An optional ``process_group`` (``set_process_group``): while ``step()`` runs, the shared
  curvature engines average losses, gradients and HVPs across it (see
  :mod:`natasha_ext.distributed`); the Philox seed is broadcast when the group is attached.
* Extra, non-per-parameter state round-trips through ``state_dict()["natasha"]`` as plain
  ints/floats/tensors, so ``torch.load(weights_only=True)`` accepts it.
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional

import torch

from natasha_ext import distributed, ops
from natasha_ext.ops import PhiloxStream


class NonFiniteError(FloatingPointError):
    """Raised instead of skipping a step when ``raise_on_nonfinite=True``."""


class NatashaOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses call ``super().__init__(params, defaults, fused=..., seed=...)``."""

    #: names of the counters this optimizer exposes in ``self.counters``
    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps")

    def __init__(self, params, defaults: dict, *, fused: Optional[bool] = None, seed: Optional[int] = None,
                 raise_on_nonfinite: bool = False, process_group=None):
        super().__init__(params, defaults)
        self._check_params()
        self.fused = self._resolve_fused(fused)
        self.raise_on_nonfinite = bool(raise_on_nonfinite)
        self.rng = PhiloxStream(seed)
        self.counters: Dict[str, float] = {k: 0 for k in self.COUNTERS}
        self._process_group = None
        if process_group is not None:
            self.set_process_group(process_group)

    # ------------------------------------------------------------------ distributed
    def __init_subclass__(cls, **kwargs):
        # Every subclass's step() runs with its process group active, so the shared engines
        # (natasha_ext.curvature.hvp) and the closure's loss are averaged across ranks without
        # per-family code. Without a group the wrapper is a plain call.
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is None or getattr(step, "_natasha_group_wrapped", False):
            return

        @functools.wraps(step)
        def step_with_group(self, *args, **kw):
            group = getattr(self, "_process_group", None)
            if group is None or distributed.active_group() is group:  # none, or a nested super().step
                return step(self, *args, **kw)
            if args:
                args = (distributed.wrap_closure(args[0], group),) + tuple(args[1:])
            elif kw.get("closure") is not None:
                kw["closure"] = distributed.wrap_closure(kw["closure"], group)
            with distributed.using_group(group):
                return step(self, *args, **kw)

        step_with_group._natasha_group_wrapped = True
        cls.step = step_with_group

    @property
    def process_group(self):
        """The torch.distributed group this optimizer averages over (None: single process)."""
        return getattr(self, "_process_group", None)

    def set_process_group(self, group) -> None:
        """Attach to ``group`` (``natasha_ext.distributed.WORLD`` for the default group; None
        detaches). Broadcasts the Philox (seed, offset) from the group's first rank so every rank
        draws the same probes. Collective: call it on every rank of the group."""
        if group is None:
            self._process_group = None
            return
        group = distributed._resolve(group)
        distributed.broadcast_rng(self.rng, group)
        self._process_group = group

    def reduce_mean(self, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
        """Average ``tensors`` over the process group in one bucketed collective (inputs
        untouched; returns new tensors). Identity without a group. The hook for statistics the
        shared engines do not see (e.g. K-FAC factors)."""
        group = self.process_group
        if group is None:
            return list(tensors)
        return distributed.all_reduce_mean(tensors, group)

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        first = None
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                where = f"params (group {gi}, index {pi})"
                if p.is_complex():
                    raise TypeError(f"{where} is complex ({p.dtype}); {type(self).__name__} supports real "
                                    "floating-point parameters only")
                if not p.is_floating_point():
                    raise TypeError(f"{where} has dtype {p.dtype}; expected a floating-point parameter")
                if p.is_sparse:
                    raise TypeError(f"{where} is sparse; sparse parameters are not supported")
                if first is None:
                    first = p
                elif p.device != first.device:
                    raise ValueError(f"{where} is on {p.device} but the first parameter is on {first.device}; "
                                     f"{type(self).__name__} needs all parameters on one device")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "fused"):
            self._check_params()

    def _resolve_fused(self, fused: Optional[bool]) -> bool:
        params = [p for g in self.param_groups for p in g["params"]]
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if not params:
            return False
        return ops._dispatch.use_fused(params, fused)

    @staticmethod
    def check_grads(params: Iterable[torch.Tensor]) -> None:
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"params[{i}] has a sparse gradient; sparse gradients are not supported")

    def all_finite(self, tensors: List[torch.Tensor]) -> bool:
        """One host sync: True when every element of ``tensors`` is finite."""
        if not tensors:
            return True
        return bool(torch.isfinite(ops.global_norm(tensors, fused=self.fused)))

    def skip_nonfinite(self, what: str) -> None:
        """Count a skipped step (or raise when ``raise_on_nonfinite``)."""
        if self.raise_on_nonfinite:
            raise NonFiniteError(f"{type(self).__name__}: non-finite values in {what}; step not taken")
        self.counters["skipped_steps"] += 1

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        """Non-per-parameter state to checkpoint; subclasses extend the dict."""
        return {"rng": self.rng.state_dict(), "counters": dict(self.counters)}

    def load_extra_state(self, state: dict) -> None:
        self.rng.load_state_dict(state["rng"])
        self.counters.update(state["counters"])

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["natasha"] = self.extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("natasha", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.load_extra_state(extra)

    def __getstate__(self) -> dict:
        # torch.optim keeps only defaults/state/param_groups; deepcopy and pickle must also carry
        # the stream, counters and the subclasses' public attributes (private ones are hooks).
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        return state
