"""Plumbing shared by every optimizer of the package (a torch.optim.Optimizer subclass).

* ``fused=None|True|False``: the user's request, kept as given and passed to every op call (the
  ops decide per call: False the reference, True the kernel or an error with the reason, None
  the kernel when it can take the arguments, else the reference). ``fused=True`` is also checked
  once at construction so a missing build fails early.
* One state policy: per-parameter state named in ``ACCUMULATION_STATE`` lives in
  :func:`natasha_ext.precision.accumulation_dtype` of its parameter and is restored in that
  dtype by ``load_state_dict`` (torch.optim would cast it to the parameter dtype).
* A Philox stream (seed, offset) for the optimizer's random draws, kept in ``state_dict``.
* Counters users can log (gradients, HVPs, skipped steps ...), kept in ``state_dict``.
* Parameter checks: sparse gradients, complex parameters, mixed devices are refused with
  errors naming the argument; each family's ``_check_group`` validates a param group's
  hyperparameters in ``__init__``, ``add_param_group``, every ``step`` and ``load_state_dict``.
* ``load_state_dict`` checks everything first (class tag, group keys and values, state shapes)
  and either loads all of it or changes nothing.
* Closures: ``step()`` runs inside :func:`natasha_ext.curvature.hvp.watching` over the
  optimizer's parameters, so the engines accept both closure conventions (the package's, which
  returns the loss without backward, and torch.optim's/Lightning's, which calls backward) and
  refuse, naming the argument, the settings that need the package's (``hvp='exact'``,
  ``curvature='gauss_newton'``).
* An optional ``process_group`` (``set_process_group``): while ``step()`` runs, the shared
  curvature engines average losses, gradients and HVPs across it (see
  :mod:`natasha_ext.distributed`); the Philox seed is broadcast when the group is attached.
* Extra, non-per-parameter state round-trips through ``state_dict()["natasha"]`` as plain
  ints/floats/tensors, so ``torch.load(weights_only=True)`` accepts it.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, Iterable, List, Optional

import torch

from natasha_ext import distributed, ops
from natasha_ext.curvature import hvp
from natasha_ext.ops import PhiloxStream
from natasha_ext.precision import accumulation_dtype

#: The arguments every optimizer of the package shares, documented once; each class's docstring
#: carries them through :func:`shared_args_doc`.
SHARED_ARGS_DOC = """\
        fused (bool, optional): the compiled kernels. None (default): a kernel where it can take
            the arguments, else the pure-PyTorch reference (said once in a debug log); True:
            require the kernels (a RuntimeError with the reason otherwise); False: always the
            reference. ``opt.fused`` reads the request back.
        seed (int, optional): seed of the optimizer's Philox stream (probes, start vectors,
            signs); None draws it from torch's global generator. The stream's (seed, offset)
            is saved in ``state_dict``, so a resumed run draws the same numbers.
        raise_on_nonfinite (bool): raise :class:`NonFiniteError` instead of skipping a step whose
            gradients or curvature products hold NaN/inf (default False: skip it, count it in
            ``counters['skipped_steps']``, change nothing).
        process_group (optional): a torch.distributed group (``natasha_ext.distributed.WORLD``
            for the default one): losses, gradients and curvature products are averaged across
            its ranks and the Philox seed is broadcast from its first rank, so every rank takes
            the same step (see :mod:`natasha_ext.distributed`)."""


def shared_args_doc(cls):
    """Class decorator: replace the ``{shared_args}`` line of ``cls.__doc__`` by
    :data:`SHARED_ARGS_DOC` (docstrings may be stripped under ``python -OO``)."""
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("        {shared_args}", SHARED_ARGS_DOC)
    return cls


class NonFiniteError(FloatingPointError):
    """Raised instead of skipping a step when ``raise_on_nonfinite=True``."""


class NatashaOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses call ``super().__init__(params, defaults, fused=..., seed=...)``."""

    #: names of the counters this optimizer exposes in ``self.counters``
    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps")
    #: per-parameter state kept in the accumulation dtype of its parameter (fp32 for fp16/bf16/
    #: fp32 parameters, fp64 for fp64 ones); ``load_state_dict`` restores these keys in that dtype
    ACCUMULATION_STATE: tuple = ()
    #: private attributes that deepcopy/pickle carry (the others are hooks and caches)
    _PICKLED_PRIVATE: tuple = ("_fused",)
    #: the practical (non-paper) settings of :meth:`practical`; the constructor's defaults are the
    #: paper's algorithm and numbers (README, "Defaults and the papers")
    PRACTICAL: Dict[str, object] = {}

    @classmethod
    def practical(cls, params, **overrides):
        """An instance with the practical settings of :attr:`PRACTICAL`, ``overrides`` on top (the
        one preset style of every family: ``Cls(params)`` is the paper, ``Cls.practical(params)``
        the named practice)."""
        return cls(params, **cls._practical_kwargs(overrides))

    @classmethod
    def _practical_kwargs(cls, overrides: dict) -> dict:
        return {**cls.PRACTICAL, **overrides}

    def __init__(self, params, defaults: dict, *, fused: Optional[bool] = None, seed: Optional[int] = None,
                 raise_on_nonfinite: bool = False, process_group=None):
        super().__init__(params, defaults)
        self._check_params()
        self._check_groups()
        self._fused = self._check_fused(fused)
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
            self._check_groups()  # the group dicts may have been edited (LR schedulers, users)
            had_state = {id(p) for p, st in self.state.items() if st}
            try:
                return _step_in_group(self, *args, **kw)
            except BaseException:
                # a step that raises leaves no lazily created state behind (the first step's zeros,
                # made before the closure ran): the call changed nothing
                for p in [p for p, st in self.state.items() if st and id(p) not in had_state]:
                    del self.state[p]
                raise

        def _step_in_group(self, *args, **kw):
            group = getattr(self, "_process_group", None)
            # the engines tell the two closure conventions apart by these parameters' .grad
            watch = hvp.watching([p for g in self.param_groups for p in g["params"]])
            if group is None or distributed.active_group() is group:  # none, or a nested super().step
                with watch:
                    return step(self, *args, **kw)
            if args:
                args = (distributed.wrap_closure(args[0], group),) + tuple(args[1:])
            elif kw.get("closure") is not None:
                kw["closure"] = distributed.wrap_closure(kw["closure"], group)
            with distributed.using_group(group), watch:
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
                if p.is_meta:
                    raise ValueError(f"{where} is on the meta device (no data); materialise the model first "
                                     "(e.g. model.to_empty(device=...) and initialise it)")
                if first is None:
                    first = p
                elif p.device != first.device:
                    raise ValueError(f"{where} is on {p.device} but the first parameter is on {first.device}; "
                                     f"{type(self).__name__} needs all parameters on one device")

    def add_param_group(self, param_group: dict) -> None:
        """torch.optim's add_param_group, then the parameter and hyperparameter checks; a group
        that fails them is removed again (the optimizer is left as it was)."""
        super().add_param_group(param_group)
        if "_fused" in self.__dict__:  # past __init__ (which checks the groups it was given)
            try:
                self._check_params()
                self._check_groups()
            except Exception:
                self.param_groups.pop()
                raise

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def _check_group(cls, group: dict) -> None:
        """The family's validator of one param group's hyperparameters (host-side, cheap; errors
        name the argument): used on the defaults by ``__init__`` and on every group by
        ``add_param_group``, ``step`` and ``load_state_dict``."""

    def _check_groups(self, groups: Optional[List[dict]] = None) -> None:
        """Validate every param group (``groups``: the given dicts instead of this optimizer's);
        the error names the group."""
        for gi, group in enumerate(self.param_groups if groups is None else groups):
            try:
                self._check_group(group)
            except (ValueError, TypeError) as e:
                raise type(e)(f"{type(self).__name__}: param group {gi}: {e}") from None

    def _check_fused(self, fused: Optional[bool]) -> Optional[bool]:
        """The request as given; ``fused=True`` fails here, with the reason, when no kernel is
        loaded for the parameters' device (every op would refuse it at the first step)."""
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        params = [p for g in self.param_groups for p in g["params"]]
        if fused and params:
            ops._dispatch.use_fused(params, True)
        return fused

    @property
    def fused(self) -> Optional[bool]:
        """The ``fused`` request (None, True or False) that every op call of this optimizer gets."""
        return self._fused

    @fused.setter
    def fused(self, fused: Optional[bool]) -> None:
        # Switching paths between steps is allowed (benchmarks time both on one optimizer); the
        # request is checked exactly as the constructor checks it.
        self._fused = self._check_fused(fused)

    def accumulation_zeros(self, p: torch.Tensor) -> torch.Tensor:
        """Zeros shaped like ``p`` in its accumulation dtype (contiguous): new optimizer state."""
        return torch.zeros(p.shape, dtype=accumulation_dtype(p), device=p.device)

    @staticmethod
    def check_grads(params: Iterable[torch.Tensor]) -> None:
        for i, p in enumerate(params):
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"params[{i}] has a sparse gradient; sparse gradients are not supported")

    def no_closure_no_gradients(self, usage: str):
        """The error of ``step()`` called without a closure when no parameter has a gradient
        (a silent no-op would hide a forgotten closure)."""
        return RuntimeError(f"{type(self).__name__}.step() got no closure and no parameter has a gradient: pass "
                            f"step(closure) (closure() returns the loss, with or without calling backward) or {usage}")

    def list_norms(self, *lists: List[torch.Tensor]) -> List[float]:
        """One host sync: the L2 norm of each list of tensors (0.0 for an empty list; inf when a
        value is not finite, or the sum of squares overflows the accumulation dtype)."""
        dev = next((ts[0].device for ts in lists if len(ts)), torch.device("cpu"))
        norms = [ops.global_norm(ts, fused=self.fused).double() if len(ts) else torch.zeros((), dtype=torch.float64,
                                                                                              device=dev)
                 for ts in lists]
        return [float(x) for x in torch.stack(norms).tolist()] if norms else []

    def all_finite(self, tensors: List[torch.Tensor]) -> bool:
        """One host sync: True when every element of ``tensors`` is finite."""
        return math.isfinite(self.list_norms(tensors)[0])

    def skip_nonfinite(self, what: str) -> None:
        """Count a skipped step (or raise when ``raise_on_nonfinite``)."""
        if self.raise_on_nonfinite:
            raise NonFiniteError(f"{type(self).__name__}: non-finite values in {what}; step not taken")
        self.counters["skipped_steps"] += 1

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        """Non-per-parameter state to checkpoint; subclasses extend the dict. ``class`` tags the
        optimizer class, which ``load_state_dict`` checks."""
        return {"class": type(self).__name__, "rng": self.rng.state_dict(), "counters": dict(self.counters)}

    def load_extra_state(self, state: dict) -> None:
        self.rng.load_state_dict(state["rng"])
        self.counters.update(state["counters"])

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["natasha"] = self.extra_state()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, checked first so that it either loads everything or
        changes nothing: the optimizer class, each group's keys and hyperparameters, the extra
        state's sections and every per-parameter state tensor's shape."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("natasha", None)
        self._check_loadable(state_dict, extra)
        super().load_state_dict(state_dict)
        self._restore_accumulation_state(state_dict)
        self.load_extra_state(extra)

    def _check_loadable(self, state_dict: dict, extra) -> None:
        name = type(self).__name__
        if not isinstance(extra, dict):
            raise ValueError(f"{name}.load_state_dict: state_dict has no 'natasha' section; it was not saved by a "
                             "natasha_ext optimizer")
        saved_class = extra.get("class", name)  # checkpoints older than the tag: checked by their contents
        if saved_class != name:
            raise ValueError(f"{name}.load_state_dict: the state_dict was saved by {saved_class}; load it into a "
                             f"{saved_class}")
        missing = sorted(set(self.extra_state()) - set(extra) - {"class"})
        if missing:
            raise ValueError(f"{name}.load_state_dict: the 'natasha' section lacks {missing}")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: the state_dict has "
                             f"{len(groups) if isinstance(groups, list) else 'no'} param groups, the optimizer "
                             f"{len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            lacking = sorted(set(group) - set(saved))
            if lacking:
                raise ValueError(f"{name}.load_state_dict: param group {gi} of the state_dict lacks {lacking}")
        self._check_groups(groups)
        saved_state = state_dict.get("state", {})
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            for pid, p in zip(saved["params"], group["params"]):
                for key, value in saved_state.get(pid, {}).items():
                    if not isinstance(value, torch.Tensor) or value.dim() == 0:
                        continue  # scalars (step counts) fit any parameter
                    want = self._state_shape(p, key)
                    if want is not None and (len(want) != value.dim() or
                                             any(w not in (-1, v) for w, v in zip(want, value.shape))):
                        raise ValueError(f"{name}.load_state_dict: state[{key!r}] of parameter {pid} (param group "
                                         f"{gi}) has shape {tuple(value.shape)}, expected {tuple(want)} for a "
                                         f"parameter of shape {tuple(p.shape)}")

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple]:
        """The shape per-parameter state ``key`` of ``p`` must have (-1: any size; None: not
        checked). Per-parameter state is shaped like its parameter unless a family says so."""
        return tuple(p.shape)

    def _restore_accumulation_state(self, state_dict: dict) -> None:
        # torch.optim casts floating state to the parameter dtype; the ACCUMULATION_STATE of
        # fp16/bf16 parameters is fp32, so it is restored from the saved tensors in its own dtype
        # (a resume stays bit-identical)
        saved = state_dict["state"]
        for g_saved, g in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(g_saved["params"], g["params"]):
                entry = saved.get(pid, {})
                for key in self.ACCUMULATION_STATE:
                    if isinstance(entry.get(key), torch.Tensor):
                        self.state[p][key] = entry[key].to(device=p.device, dtype=accumulation_dtype(p), copy=True)

    def __getstate__(self) -> dict:
        # torch.optim keeps only defaults/state/param_groups; deepcopy and pickle must also carry
        # the stream, counters, the fused request and the subclasses' public attributes (other
        # private ones are hooks).
        state = super().__getstate__()
        state.update({k: v for k, v in self.__dict__.items() if not k.startswith("_") or k in self._PICKLED_PRIVATE})
        return state
