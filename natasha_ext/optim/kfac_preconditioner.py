"""K-FAC, ANG and IFANG as a gradient preconditioner under any torch optimizer.

``KFACPreconditioner(model, method)`` hooks the model's layers that K-FAC preconditions and, in
:meth:`~KFACPreconditioner.step`, replaces each such layer's gradient ``.grad`` (weight and bias
together, the matrix T = [dW | db]) by its K-FAC / ANG / IFANG direction d, in place. The torch
optimizer then takes its step on d: ``p <- p - lr d`` under ``torch.optim.SGD(momentum=0)``, and
momentum, Adam's moments, LARS' trust ratio, weight decay and LR schedulers act on d as they
would on a gradient::

    precond = KFACPreconditioner(model, "kfac", damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()        # .grad <- d
        opt.step()

The directions are computed by the optimizer of the method, :class:`~natasha_ext.optim.KFAC`,
:class:`~natasha_ext.optim.ANG` or :class:`~natasha_ext.optim.IFANG` (``precond.engine``), whose
update ``p <- p - lr d`` is replaced by ``p.grad <- d``: the same hooks, factors, damping,
direction rule and defaults, one implementation. ``KFACPreconditioner(model, 'kfac', **s)`` under
``SGD(lr, momentum=0)`` therefore takes the steps of ``KFAC(model, lr, momentum=0, **s)``. In the
notation of Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature" (2015), Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers" (2016), and Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a
regularized natural gradient optimization algorithm with look-ahead strategy" (2021), with lam the
damping added to each factor (Tang et al. eq. 8):

* ``'kfac'``: d = U = (G + lam I)^-1 T (A + lam I)^-1, A = E[a a^T] and G = E[g g^T] moving
  averages of the layer inputs' and output gradients' second moments.
* ``'ang'``: eq. 7's spherical blend of U and T,
  d = ||t||_G (sin((1-l)W)/sin W * U/||t||_G + sin(l W)/sin W * T/||t||), cos W = t^T G^-1 t /
  (||t||_G ||t||), l going from 0 to 1 by ``lam_schedule`` over this preconditioner's steps.
* ``'ifang'``: eq. 7's blend of the inverse-free U of rank-``rank`` minibatch factors, applied by
  Sherman-Morrison-Woodbury (eqs. 9-14, Algorithms 1-2).

Settings (``damping``, ``stat_decay``, ``cov_every``, ``inv_every``, ``rank``, ``lam_schedule``,
... every keyword of the method's optimizer but those of the step itself) go to that optimizer,
with its defaults and its argument checks. Not taken: ``lr``, ``momentum``, ``weight_decay``
(the torch optimizer's). ``precond.param_groups[0]`` holds them (damping etc. may be changed
between steps, as on the optimizer).

The step size is the torch optimizer's: the preconditioner holds no learning rate, except for
KL clipping. ``kl_clip`` (default None: off) is the optimizer's KL clip, d <- nu d with
nu = min(1, sqrt(kl_clip / sum_l lr^2 d_l^T F_l d_l)) (Ba, Grosse & Martens, "Distributed
second-order optimization using Kronecker-factored approximations", 2017; for K-FAC's d = U,
d^T F d = t^T F^-1 t), which needs the lr the torch optimizer will use: pass ``lr=`` the torch
optimizer (the lr of the param group holding the preconditioned weights is read at every step,
so LR schedulers are followed), a callable returning the lr, or a float.

Weight decay is the torch optimizer's (added to d by SGD/Adam, decoupled by AdamW); parameters of
layers that are not preconditioned (``precond.fallback_names``) keep their gradient as it is. A
bias whose ``.grad`` is None stays None.

Gradient accumulation (``accumulation_steps=k``): run k forward/backward passes, each on a
micro-batch with its mean loss divided by k (``(loss / k).backward()``, so ``.grad`` is the
gradient of the concatenated batch's mean loss), then ``step()``. The hooks keep every
micro-batch's layer inputs and output gradients and the factors are formed from all of them (for
IFANG each micro-batch yields its share of the row-group means of the concatenated batch), so the
statistics, and the preconditioned gradient, equal those of one pass on the concatenated batch.
``step()`` raises (changing nothing) unless exactly k training-mode forward passes with grad
enabled ran since the last step (a forgotten micro-batch, a second ``step()`` on
already-preconditioned gradients).

Mixed precision (``grad_scaler=`` a ``torch.amp.GradScaler``): the loss scale is divided out of
the captured output gradients; ``.grad`` must be unscaled before ``step()``, as for gradient
clipping (``step()`` raises otherwise)::

    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    precond.step()            # skipped (nothing changed) when the gradients overflowed
    scaler.step(opt)          # skipped too: unscale_ recorded the overflow
    scaler.update()

Non-finite gradients or directions: ``step()`` changes nothing (no factor, inverse, ``.grad`` or
counter update but ``counters['skipped_steps']``; the captured statistics are dropped) and
returns False (``raise_on_nonfinite=True``: raises :class:`~natasha_ext.optim.NonFiniteError`).
To restore the factors after non-finite directions, a statistics step keeps a copy of them
while it runs.

Distributed data parallel (``model`` wrapped in ``DistributedDataParallel``; its process group
is used unless ``process_group=`` says otherwise): DDP averages ``.grad`` over the ranks in
backward; each rank's hooks see its own shard, and the factor statistics are averaged over the
group at every refresh (one bucketed all-reduce per dtype, after the EMA: the factors of the
global batch for equal shards; IFANG's row groups are laid out over the global batch), so every
rank computes the same d as one process on the concatenated batch. Gradients are not reduced
again.

``state_dict()`` / ``load_state_dict()``: the method and the optimizer's ``state_dict`` (factors,
inverses, step counter, settings; plain tensors and numbers, ``torch.load(weights_only=True)``
takes them); a resumed run is bit-identical. ``load_state_dict`` checks everything first and
loads all or nothing.
"""
from __future__ import annotations

import math
import re
import warnings
import weakref
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NonFiniteError
from natasha_ext.optim.kfac import ANG, IFANG, KFAC
from natasha_ext.optim.ekfac import EKFAC

__all__ = ["KFACPreconditioner", "METHODS"]

#: method -> the optimizer whose directions it computes
METHODS = {"kfac": KFAC, "ang": ANG, "ifang": IFANG, "ekfac": EKFAC}
# the optimizers' arguments that belong to the torch optimizer's step, not to the preconditioner
_STEP_ARGS = ("lr", "momentum", "weight_decay", "model", "model_or_params")
_LOW_RANK = ("kfac_YA", "kfac_YG")


class _DirectionsToGrad:
    """Mixin over a K-FAC family optimizer: ``step()`` writes each layer's direction into its
    ``.grad`` (in place) instead of updating the parameter, and folds IFANG's micro-batch shares
    of the row-group means before they are averaged over the ranks."""

    _micro_batches = 1
    _nonfinite_directions = False

    def _apply(self, directions) -> None:
        ds = list(directions.values())
        if ds and not self.all_finite(ds):
            self._nonfinite_directions = True  # KFACPreconditioner.step restores the state
            return
        for p, d in directions.items():
            if p.grad is not None:
                p.grad.copy_(d)

    def _average_across_ranks(self, tensors) -> None:
        k = self._micro_batches
        if k > 1:
            # the collector stacks the k micro-batches' shares of the s' group means as k s' rows
            # (each call's rows contiguous), scaled by 1/sqrt(k s'); the group means of the
            # concatenated batch are the average of the shares: Y = sum_j rows_j / sqrt(k)
            fresh = {id(t) for t in tensors}
            folded = {}
            for st in self._layer_states():
                for key in _LOW_RANK:
                    y = st.get(key)
                    if y is not None and id(y) in fresh:
                        st[key] = (y.reshape(k, -1, y.shape[1]).sum(0) / math.sqrt(k)).contiguous()
                        folded[id(y)] = st[key]
            tensors = [folded.get(id(t), t) for t in tensors]
        super()._average_across_ranks(tensors)


_ENGINES: Dict[type, type] = {}


def _engine_class(cls: type) -> type:
    if cls not in _ENGINES:
        _ENGINES[cls] = type(f"{cls.__name__}Directions", (_DirectionsToGrad, cls), {"__module__": __name__})
    return _ENGINES[cls]


class _CountForwards:
    """Forward pre-hook on the root module: counts the training-mode, grad-enabled forward
    passes (micro-batches). A weak link to its preconditioner; copies and pickles as a no-op."""

    def __init__(self, owner: "KFACPreconditioner"):
        self._ref = weakref.ref(owner)

    def __call__(self, module, inputs):
        owner = self._ref()
        if owner is not None and module.training and torch.is_grad_enabled():
            owner._micro_batch_starts()

    def __deepcopy__(self, memo):
        return _no_op

    def __reduce__(self):
        return (_make_no_op, ())


def _no_op(*args, **kwargs):
    return None


def _make_no_op():
    return _no_op


def _unscaled(scaler) -> bool:
    """False when ``scaler`` (enabled) has not unscaled any optimizer's gradients since its last
    update() (``.grad`` then holds scaled gradients)."""
    per_opt = getattr(scaler, "_per_optimizer_states", None)
    if per_opt is None:  # not torch's GradScaler: trust the caller
        return True
    from torch.amp.grad_scaler import OptState

    return any(s.get("stage") is OptState.UNSCALED for s in per_opt.values())


class KFACPreconditioner:
    """Rewrites the gradients of a model's K-FAC layers into K-FAC, ANG or IFANG directions, in
    place, for any torch optimizer to step on (see the module docstring).

    Args:
        model (nn.Module): the model (or its ``DistributedDataParallel`` wrapper) whose forward
            and backward passes feed the hooks; its trainable supported layers are preconditioned.
        method ('kfac' | 'ang' | 'ifang' | 'ekfac'): the direction, that of :class:`KFAC`, :class:`ANG`,
            :class:`IFANG` or :class:`EKFAC`.
        kl_clip (float, optional): KL clipping (None or 0: off, the default); needs ``lr``.
        lr: what KL clipping reads: the torch optimizer (the lr of the param group holding the
            preconditioned weights, read at every step), a callable returning the lr, or a float.
        accumulation_steps (int): micro-batches per step (module docstring; default 1).
        grad_scaler: the ``torch.amp.GradScaler`` of an AMP run (module docstring).
        process_group: a torch.distributed group (``natasha_ext.distributed.WORLD`` for the
            default) over which the factors are averaged; default: the DDP wrapper's group when
            ``model`` is one, else none.
        fused (bool, optional), raise_on_nonfinite (bool): as the optimizers'.
        **settings: the method's optimizer's settings (``damping``, ``stat_decay``, ``cov_every``,
            ``inv_every``, ``inverse``, ``rank``, ``lam_schedule``, ``total_steps``, ...), with
            its defaults.

    Attributes: ``engine`` (the optimizer computing the directions), ``param_groups`` (its one
    group: the settings), ``counters``, ``layer_names``, ``fallback_names``,
    ``last_coefficients`` (ANG/IFANG: the last [L, 2] (c1, c2) with d = c1 U + c2 T).
    """

    def __init__(self, model: nn.Module, method: str = "kfac", *, kl_clip: Optional[float] = None,
                 lr: Union[None, float, Callable[[], float], torch.optim.Optimizer] = None,
                 accumulation_steps: int = 1, grad_scaler=None, process_group=None, fused: Optional[bool] = None,
                 raise_on_nonfinite: bool = False, **settings):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        V.choice("method", method, tuple(METHODS))
        for name in _STEP_ARGS:
            if name in settings:
                raise TypeError(f"{name} is not a setting of KFACPreconditioner: the torch optimizer takes the step "
                                "(its lr, momentum, weight decay); lr= is only what kl_clip reads")
        V.positive_int("accumulation_steps", accumulation_steps)
        if kl_clip is not None:
            V.nonnegative("kl_clip", kl_clip)
        if kl_clip and lr is None:
            raise ValueError("kl_clip needs lr= (the torch optimizer, a callable returning its lr, or a float): the "
                             "clip bounds lr^2 d^T F d")
        if lr is not None and not (callable(lr) or isinstance(lr, torch.optim.Optimizer)):
            V.nonnegative("lr", lr)
        if process_group is None and isinstance(model, nn.parallel.DistributedDataParallel):
            process_group = model.process_group
        elif process_group is None and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            warnings.warn("KFACPreconditioner: torch.distributed is initialised but no process_group was given and "
                          "model is not DistributedDataParallel: the factors are not averaged over the ranks, whose "
                          "directions then differ; pass process_group=natasha_ext.distributed.WORLD", RuntimeWarning,
                          stacklevel=2)
        try:
            engine = _engine_class(METHODS[method])(
                model, lr=0.0, momentum=0.0, weight_decay=0.0, kl_clip=kl_clip or None, grad_scaler=grad_scaler,
                fused=fused, raise_on_nonfinite=raise_on_nonfinite, process_group=process_group, **settings)
        except TypeError as e:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if unknown is None:
                raise
            raise TypeError(f"{unknown.group(1)} is not a setting of method={method!r} (see "
                            f"{METHODS[method].__name__}'s arguments)") from None
        if method == "ifang":
            engine._micro_batches = int(accumulation_steps)
        self.method = method
        self.engine = engine
        self.lr = lr
        self.accumulation_steps = int(accumulation_steps)
        self.grad_scaler = grad_scaler
        self._forwards = 0
        self._handle = model.register_forward_pre_hook(_CountForwards(self))
        weakref.finalize(self, self._handle.remove)

    # ------------------------------------------------------------------ what the engine holds
    param_groups = property(lambda self: self.engine.param_groups)
    counters = property(lambda self: self.engine.counters)
    layer_names = property(lambda self: self.engine.layer_names)
    fallback_names = property(lambda self: self.engine.fallback_names)
    last_coefficients = property(lambda self: getattr(self.engine, "last_coefficients", None))

    def __repr__(self):
        return (f"KFACPreconditioner(method={self.method!r}, accumulation_steps={self.accumulation_steps}, "
                f"kl_clip={self.engine.kl_clip},\n  preconditioned ({len(self.layer_names)}): "
                f"{', '.join(self.layer_names)}\n  gradient left as is ({len(self.fallback_names)}): "
                f"{', '.join(self.fallback_names) or '-'}\n)")

    def remove_hooks(self) -> None:
        """Unregister every hook this preconditioner placed on the model (``step()`` then raises)."""
        self.engine.remove_hooks()
        self._handle.remove()

    # ------------------------------------------------------------------ step
    def _micro_batch_starts(self) -> None:
        """Before micro-batch j's forward: IFANG's row groups span the global batch of
        world x accumulation_steps micro-batches (micro-batch j of rank r is its (r k + j)-th
        block), so this pass yields its share of every group mean."""
        col, k = self.engine._collector, self.accumulation_steps
        if col is not None and self.method == "ifang" and k > 1:
            r, world = self.engine._shard()
            col.shard = (r * k + min(self._forwards, k - 1), world * k)
        self._forwards += 1

    def _current_lr(self) -> float:
        lr = self.lr
        if isinstance(lr, torch.optim.Optimizer):
            weights = {id(w) for w in self._weights()}
            lrs = {g["lr"] for g in lr.param_groups if any(id(p) in weights for p in g["params"])}
            if len(lrs) != 1:
                raise ValueError(f"lr: the preconditioned weights are in param groups of the optimizer with the lrs "
                                 f"{sorted(lrs)}; KL clipping needs one lr (pass lr= a float or a callable)")
            lr = lrs.pop()
        elif callable(lr):
            lr = lr()
        return float(V.nonnegative("lr", 0.0 if lr is None else lr))

    def _weights(self):
        return [layer.weight for layer in self.engine._layers]

    @torch.no_grad()
    def step(self) -> bool:
        """Replace the preconditioned layers' ``.grad`` by their directions (in place). Call it
        after the backward pass(es) and before ``optimizer.step()``. Returns True, or False when
        non-finite values made it skip (nothing changed)."""
        eng = self.engine
        if eng._collector is None:
            raise RuntimeError("KFACPreconditioner has no hooks (remove_hooks() was called)")
        if self._forwards != self.accumulation_steps:
            raise RuntimeError(f"KFACPreconditioner.step(): accumulation_steps={self.accumulation_steps} but "
                               f"{self._forwards} training forward passes with grad enabled ran since the last "
                               "step (run exactly accumulation_steps micro-batches, forward and backward, per "
                               "step(); evaluate under torch.no_grad() or model.eval())")
        if all(p.grad is None for g in eng.param_groups for p in g["params"]):
            raise RuntimeError("KFACPreconditioner.step(): no parameter has a gradient; run loss.backward() first")
        if self.grad_scaler is not None and self.grad_scaler.is_enabled() and not _unscaled(self.grad_scaler):
            raise RuntimeError("KFACPreconditioner.step(): the gradients are still scaled by grad_scaler; call "
                               "scaler.unscale_(optimizer) before precond.step()")
        lr = self._current_lr() if eng.kl_clip else 0.0  # only the KL clip reads it
        for group in eng.param_groups:
            group["lr"] = lr
        # a statistics step updates factors in place: keep copies to restore on non-finite directions
        saved_state = {p: {k: (v.clone() if eng.collecting and isinstance(v, torch.Tensor) else v)
                           for k, v in st.items()} for p, st in eng.state.items()}
        saved_counters = dict(eng.counters)
        saved_coefficients = getattr(eng, "last_coefficients", None)
        skipped = eng.counters["skipped_steps"]
        eng._nonfinite_directions = False
        try:
            eng.step()
        except NonFiniteError:  # a skipped step (raise_on_nonfinite): its micro-batches are spent
            self._forwards = 0
            raise
        self._forwards = 0
        if eng._nonfinite_directions:
            eng.state.clear()
            eng.state.update(saved_state)
            eng.counters.clear()
            eng.counters.update(saved_counters)
            if saved_coefficients is not None or hasattr(eng, "last_coefficients"):
                eng.last_coefficients = saved_coefficients
            eng._collector.collecting = eng._due(eng.cov_every)
            eng.skip_nonfinite("directions")
        return eng.counters["skipped_steps"] == skipped

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """{'method', 'engine': the optimizer's state_dict (factors, counters, settings)}."""
        return {"method": self.method, "engine": self.engine.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; checks everything first, then loads all of it or nothing."""
        if not isinstance(state_dict, dict) or set(state_dict) != {"method", "engine"}:
            raise ValueError("KFACPreconditioner.load_state_dict: not a KFACPreconditioner state_dict (needs exactly "
                             "'method' and 'engine')")
        if state_dict["method"] != self.method:
            raise ValueError(f"KFACPreconditioner.load_state_dict: saved by method={state_dict['method']!r}; this "
                             f"preconditioner has method={self.method!r}")
        engine = state_dict["engine"]
        for pid, st in (engine.get("state", {}) if isinstance(engine, dict) else {}).items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise ValueError(f"KFACPreconditioner.load_state_dict: state[{k!r}] of parameter {pid} is not "
                                     "finite")
        self.engine.load_state_dict(engine)
        self._forwards = 0
