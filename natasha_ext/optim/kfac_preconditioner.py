"""K-FAC, ANG and IFANG as a gradient preconditioner under any torch optimizer.

``KFACPreconditioner(model, method)`` hooks the model's supported layers (those of
:class:`~natasha_ext.optim.KFAC`: ``nn.Linear`` and ``nn.Conv2d``, found by
:func:`natasha_ext.curvature.kfac_factors.find_layers`) and, in :meth:`~KFACPreconditioner.step`,
replaces each such layer's gradient ``.grad`` (weight and bias together, the matrix T = [dW | db])
by its K-FAC / ANG / IFANG direction d, in place. The torch optimizer then takes its step on d:
``p <- p - lr d`` under ``torch.optim.SGD(momentum=0)``, and momentum, Adam's moments, LARS'
trust ratio, weight decay and LR schedulers act on d as they would on a gradient::

    precond = KFACPreconditioner(model, "kfac", damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()        # .grad <- d
        opt.step()

The directions (Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature", 2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers", 2016; Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a
regularized natural gradient optimization algorithm with look-ahead strategy", 2021), with
lam added to each factor (Tang et al. eq. 8): ``factor_damping`` when given, else sqrt(damping),
Martens & Grosse's factored Tikhonov damping of the block A (x) G + damping I:

* ``'kfac'``: d = U = (G + lam I)^-1 T (A + lam I)^-1, A = E[a a^T] and G = E[g g^T] exponential
  moving averages (``stat_decay``) refreshed every ``cov_every`` steps, inverted every
  ``inv_every`` steps (:class:`natasha_ext.curvature.kronecker.DenseKronecker`).
* ``'ang'``: the same U blended with T by Tang et al.'s eq. 7,
  d = ||t||_G (sin((1-l)W)/sin W * U/||t||_G + sin(l W)/sin W * T/||t||), cos W = t^T G^-1 t /
  (||t||_G ||t||), l from 0 to 1 by ``lam_schedule`` (:mod:`natasha_ext.optim.lambda_schedules`)
  over this preconditioner's steps (eq. 7's fallback: T when t^T G^-1 t <= 0).
* ``'ifang'``: eq. 7's blend of the inverse-free U = (lam I + YG^T YG)^-1 T (lam I + YA^T YA)^-1
  of rank-``rank`` factors from the current minibatch, applied by Sherman-Morrison-Woodbury
  (eqs. 9-14, Algorithms 1-2; :class:`natasha_ext.curvature.kronecker.LowRankKronecker`).

The factors are those of the optimizers :class:`~natasha_ext.optim.KFAC`,
:class:`~natasha_ext.optim.ANG`, :class:`~natasha_ext.optim.IFANG` (the same collector, strategies
and ops), and so are the defaults of every setting left at None. ``KFACPreconditioner(model,
'kfac', ...)`` under ``SGD(lr, momentum=0)`` takes the steps of ``KFAC(model, lr, momentum=0,
...)`` with the same settings.

The step size is the torch optimizer's: the preconditioner holds no learning rate, except for
KL clipping. ``kl_clip`` (default None: off) scales d by nu = min(1, sqrt(kl_clip / sum_l lr_l^2
t_l^T F_l^-1 t_l)) (:func:`natasha_ext.curvature.kl_clip.kl_clip_scale`), which needs the lr
the optimizer will use: pass ``lr=`` the torch optimizer (each layer then reads the lr of the
param group holding its weight at every step, so LR schedulers are followed), a callable
returning the lr, or a float.

Weight decay is the torch optimizer's (added to d by SGD/Adam, decoupled by AdamW); parameters of
layers that are not preconditioned (norms, embeddings, ...: ``precond.fallback_names``) keep
their gradient as it is. A bias whose ``.grad`` is None stays None.

Gradient accumulation (``accumulation_steps=k``): run k forward/backward passes, each on a
micro-batch with its mean loss divided by k (``(loss / k).backward()``, so ``.grad`` is the
gradient of the concatenated batch's mean loss), then ``step()``. The hooks keep every
micro-batch's layer inputs and output gradients and the factors are formed from all of them, so
the statistics, and the preconditioned gradient, equal those of one pass on the concatenated
batch. ``step()`` raises (changing nothing) unless exactly k training-mode forward passes with
grad enabled ran since the last step (a forgotten micro-batch, a second ``step()`` on
already-preconditioned gradients).

Mixed precision (``grad_scaler=`` a ``torch.amp.GradScaler``): the loss scale is divided out of
the captured output gradients; ``.grad`` must be unscaled before ``step()``, as for gradient
clipping (``step()`` raises otherwise)::

    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    precond.step()            # skipped (nothing changed) when the gradients overflowed
    scaler.step(opt)          # skipped too: unscale_ recorded the overflow
    scaler.update()

Non-finite gradients, factors or directions: ``step()`` changes nothing (no factor, inverse,
``.grad`` or step-counter update; the captured statistics are dropped), counts the skip in
``counters['skipped_steps']`` and returns False (``raise_on_nonfinite=True``: raises
:class:`~natasha_ext.optim.NonFiniteError` instead).

Distributed data parallel (``model`` wrapped in ``DistributedDataParallel``; its process group
is used unless ``process_group=`` says otherwise): DDP averages ``.grad`` over the ranks in
backward; each rank's hooks see its own shard, and the factor statistics of every refresh are
averaged over the group (one bucketed all-reduce per dtype, after the EMA: A and G of the
global batch for equal shards; IFANG's row groups are laid out over the global batch), so every
rank computes the same d as one process on the concatenated batch, and no gradient is reduced
twice.

``state_dict()`` / ``load_state_dict()``: the factors (and inverses), the step counter (the
statistics/inverse schedule and ANG's l position) and the settings, as plain tensors and
numbers (``torch.load(weights_only=True)`` accepts them); a resumed run is bit-identical.
``load_state_dict`` checks everything first and loads all or nothing.
"""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from natasha_ext import distributed, ops
from natasha_ext.curvature.kfac_factors import FactorCollector, find_layers
from natasha_ext.curvature.kl_clip import kl_clip_scale
from natasha_ext.curvature.kronecker import INVERSES, DenseKronecker, LowRankKronecker
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NonFiniteError
from natasha_ext.optim.kfac import ANG, IFANG, KFAC
from natasha_ext.optim.lambda_schedules import lambda_schedule
from natasha_ext.precision import accumulation_dtype

__all__ = ["KFACPreconditioner", "METHODS"]

#: method -> the optimizer whose directions and defaults it takes
METHODS = {"kfac": KFAC, "ang": ANG, "ifang": IFANG}
# the settings of each method (a setting another method has is refused, naming it)
_DENSE = ("damping", "stat_decay", "cov_every", "inv_every", "inverse")
_BLEND = ("lam_schedule", "total_steps", "lam_rate", "lam_time_constant", "per_layer")
_SETTINGS = {"kfac": _DENSE, "ang": _DENSE + _BLEND, "ifang": ("damping", "cov_every", "rank") + _BLEND}
# the settings that may change during training (attributes users may set; saved in state_dict)
_MUTABLE = ("damping", "factor_damping", "kl_clip", "cov_every", "stat_decay", "inv_every")


def _method_default(method: str, name: str):
    """The default of ``name`` in the constructor of the method's optimizer class."""
    return inspect.signature(METHODS[method].__init__).parameters[name].default


def _resolve_damping(method: str, damping, factor_damping):
    """(damping, factor_damping), one of them None: factor_damping when given, else damping, else
    the method's optimizer's default (its damping, or its DEFAULT_FACTOR_DAMPING where the class
    has one and no default damping)."""
    if factor_damping is not None:
        return None, factor_damping
    if damping is not None:
        return damping, None
    default = _method_default(method, "damping")
    if default is not None:
        return default, None
    return None, getattr(METHODS[method], "DEFAULT_FACTOR_DAMPING", None)


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


def _remove_handles(handles):
    for h in handles:
        h.remove()
    handles.clear()


def _unscaled(scaler) -> bool:
    """False when ``scaler`` (enabled) has not unscaled any optimizer's gradients since its last
    update() (then ``.grad`` holds scaled gradients)."""
    per_opt = getattr(scaler, "_per_optimizer_states", None)
    if per_opt is None:  # not torch's GradScaler: trust the caller
        return True
    from torch.amp.grad_scaler import OptState

    return any(s.get("stage") is OptState.UNSCALED for s in per_opt.values())


class KFACPreconditioner:
    """Rewrites the gradients of a model's Linear/Conv2d layers into K-FAC, ANG or IFANG
    directions, in place, for any torch optimizer to step on (see the module docstring).

    Args:
        model (nn.Module): the model (or its ``DistributedDataParallel`` wrapper) whose forward
            and backward passes feed the hooks; every trainable supported layer is
            preconditioned.
        method ('kfac' | 'ang' | 'ifang'): the direction (module docstring).
        damping: gamma of the Kronecker block A (x) G + gamma I, applied as factored Tikhonov
            damping: lam = sqrt(gamma) is added to each factor.
        factor_damping: lam added to each factor directly (Tang et al.'s eq. 8); replaces
            ``damping`` when given.
        stat_decay, cov_every, inv_every, inverse ('kfac', 'ang'): as :class:`KFAC`.
        rank ('ifang'): s', the rank of the minibatch factors, as :class:`IFANG`.
        lam_schedule, total_steps, lam_rate, lam_time_constant, per_layer ('ang', 'ifang'):
            eq. 7's blend schedule, as :class:`ANG`; its step is this preconditioner's.
        Every setting left at None takes the default of the method's optimizer class.
        kl_clip (float, optional): KL clipping (None or 0: off, the default); needs ``lr``.
        lr: what KL clipping reads: the torch optimizer (each layer's lr from the param group
            of its weight, read at every step), a callable returning the lr, or a float.
        accumulation_steps (int): micro-batches per step (module docstring; default 1).
        batch_averaged (bool): the loss is a mean over the batch (default True), as :class:`KFAC`.
        grad_scaler: the ``torch.amp.GradScaler`` of an AMP run (module docstring).
        process_group: a torch.distributed group (``natasha_ext.distributed.WORLD`` for the
            default) over which the factors are averaged; default: the DDP wrapper's group when
            ``model`` is one, else none.
        fused (bool, optional): the compiled kernels, as the optimizers' ``fused``.
        raise_on_nonfinite (bool): raise :class:`NonFiniteError` instead of skipping (False).

    Attributes: ``layer_names``, ``fallback_names``, ``counters`` (steps, skipped_steps,
    factor_updates, inverse_updates), ``last_coefficients`` (ANG/IFANG: the last [L, 2] (c1, c2)
    with d = c1 U + c2 T); ``damping``, ``factor_damping``, ``kl_clip``, ``cov_every``, ``stat_decay`` and
    ``inv_every`` may be changed between steps.
    """

    COUNTERS = ("steps", "skipped_steps", "factor_updates", "inverse_updates")

    def __init__(self, model: nn.Module, method: str = "kfac", *, damping: Optional[float] = None,
                 factor_damping: Optional[float] = None,
                 stat_decay: Optional[float] = None, cov_every: Optional[int] = None,
                 inv_every: Optional[int] = None, inverse: Optional[str] = None, rank: Optional[int] = None,
                 lam_schedule=None, total_steps: Optional[int] = None, lam_rate: Optional[float] = None,
                 lam_time_constant: Optional[int] = None, per_layer: Optional[bool] = None,
                 kl_clip: Optional[float] = None, lr: Union[None, float, Callable[[], float], torch.optim.Optimizer] = None,
                 accumulation_steps: int = 1, batch_averaged: bool = True, grad_scaler=None, process_group=None,
                 fused: Optional[bool] = None, raise_on_nonfinite: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        V.choice("method", method, tuple(METHODS))
        given = dict(damping=damping, stat_decay=stat_decay, cov_every=cov_every, inv_every=inv_every,
                     inverse=inverse, rank=rank, lam_schedule=lam_schedule, total_steps=total_steps,
                     lam_rate=lam_rate, lam_time_constant=lam_time_constant, per_layer=per_layer)
        for name, value in given.items():
            if value is not None and name not in _SETTINGS[method]:
                raise TypeError(f"{name} is not a setting of method={method!r} (its settings: "
                                f"{', '.join(_SETTINGS[method])})")
        s = {n: (given[n] if given[n] is not None or n in ("lam_schedule", "total_steps")
                 else _method_default(method, n)) for n in _SETTINGS[method]}
        s["damping"], s["factor_damping"] = _resolve_damping(method, damping, factor_damping)
        self._check_settings(dict(damping=s["damping"], factor_damping=s["factor_damping"], kl_clip=kl_clip,
                                  cov_every=s["cov_every"],
                                  stat_decay=s.get("stat_decay"), inv_every=s.get("inv_every")))
        V.positive_int("accumulation_steps", accumulation_steps)
        if kl_clip and lr is None:
            raise ValueError("kl_clip needs lr= (the torch optimizer, a callable returning its lr, or a float): the "
                             "clip bounds lr^2 t^T F^-1 t")
        if lr is not None and not (callable(lr) or isinstance(lr, torch.optim.Optimizer)):
            V.nonnegative("lr", lr)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if fused and params:
            ops._dispatch.use_fused(params, True)
        if method == "ifang":
            V.positive_int("rank", s["rank"])
            curvature = LowRankKronecker(s["rank"])
        else:
            V.choice("inverse", s["inverse"], INVERSES)
            curvature = DenseKronecker(s["stat_decay"], s["inv_every"], s["inverse"])
        self._lam_fn = None
        if method != "kfac":
            V.positive("lam_rate", s["lam_rate"])
            self._lam_fn = lambda_schedule(s["lam_schedule"], s["total_steps"], s["lam_rate"],
                                           s["lam_time_constant"])
        layers, fallback = find_layers(model, {p: 0 for p in params})
        if not layers:
            raise ValueError(f"model has no trainable nn.Linear / nn.Conv2d layer (groups=1) to precondition "
                             f"(not supported: {fallback or 'no layers with parameters'})")
        group = model.process_group if (process_group is None and
                                        isinstance(model, nn.parallel.DistributedDataParallel)) else process_group
        if group is not None:
            group = distributed._resolve(group)
        elif torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            warnings.warn("KFACPreconditioner: torch.distributed is initialised but no process_group was given and "
                          "model is not DistributedDataParallel: the factors are not averaged over the ranks, whose "
                          "directions then differ; pass process_group=natasha_ext.distributed.WORLD", RuntimeWarning,
                          stacklevel=2)

        self.method = method
        self.curvature = curvature
        self.damping = s["damping"]
        self.factor_damping = s["factor_damping"]
        self.kl_clip = float(kl_clip) if kl_clip else None
        self.cov_every = int(s["cov_every"])
        self.per_layer = bool(s.get("per_layer", False))
        self.lr = lr
        self.accumulation_steps = int(accumulation_steps)
        self.batch_averaged = bool(batch_averaged)
        self.grad_scaler = grad_scaler
        self.process_group = group
        self.fused = fused
        self.raise_on_nonfinite = bool(raise_on_nonfinite)
        self.counters: Dict[str, int] = {k: 0 for k in self.COUNTERS}
        self.last_coefficients: Optional[torch.Tensor] = None
        self._layers = layers
        self._params = params
        self._states: List[dict] = [{} for _ in layers]
        self.layer_names = [l.name for l in layers]
        self.fallback_names = fallback
        self._forwards = 0
        self._shard = ((torch.distributed.get_rank(group), torch.distributed.get_world_size(group))
                       if group is not None else (0, 1))
        col = FactorCollector(layers, mode=curvature.collector_mode, rank=curvature.rank,
                              batch_averaged=self.batch_averaged, grad_scaler=grad_scaler)
        col.shard = self._shard
        col.collecting = True
        self._collector: Optional[FactorCollector] = col
        self._handles = [model.register_forward_pre_hook(_CountForwards(self))]
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles + [col])

    # ------------------------------------------------------------------ settings
    stat_decay = property(lambda self: getattr(self.curvature, "stat_decay", None),
                          lambda self, v: setattr(self.curvature, "stat_decay", v))
    inv_every = property(lambda self: getattr(self.curvature, "inv_every", None),
                         lambda self, v: setattr(self.curvature, "inv_every", v))

    @property
    def rank(self) -> Optional[int]:
        """IFANG's s' (None for the dense methods)."""
        return self.curvature.rank if self.method == "ifang" else None

    def _settings(self) -> dict:
        dense = ("stat_decay", "inv_every")
        return {k: getattr(self, k) for k in _MUTABLE if self.method != "ifang" or k not in dense}

    @staticmethod
    def _check_settings(s: dict) -> None:
        """The settings that may change between steps (errors name them)."""
        for key in ("damping", "factor_damping"):
            if s.get(key) is not None:
                V.positive(key, s[key])
        if (s.get("damping") is None) == (s.get("factor_damping") is None):
            raise ValueError(f"exactly one of damping and factor_damping must be set, got damping={s.get('damping')!r}, "
                             f"factor_damping={s.get('factor_damping')!r}")
        if s.get("kl_clip") is not None:
            V.nonnegative("kl_clip", s["kl_clip"])
        V.positive_int("cov_every", s["cov_every"])
        if s.get("stat_decay") is not None:
            V.in_range("stat_decay", s["stat_decay"], 0.0, 1.0)
        if s.get("inv_every") is not None:
            V.positive_int("inv_every", s["inv_every"])

    def __repr__(self):
        return (f"KFACPreconditioner(method={self.method!r}, damping={self.damping}, factor_damping="
                f"{self.factor_damping}, kl_clip={self.kl_clip}, "
                f"accumulation_steps={self.accumulation_steps},\n"
                f"  preconditioned ({len(self.layer_names)}): {', '.join(self.layer_names)}\n"
                f"  gradient left as is ({len(self.fallback_names)}): {', '.join(self.fallback_names) or '-'}\n)")

    def remove_hooks(self) -> None:
        """Unregister every hook this preconditioner placed on the model (``step()`` then raises)."""
        self._finalizer()
        self._collector = None

    # ------------------------------------------------------------------ step
    def _due(self, every: int) -> bool:
        return self.counters["steps"] % every == 0

    def _layer_lrs(self, idx: List[int]) -> List[float]:
        lr = self.lr
        if isinstance(lr, torch.optim.Optimizer):
            of = {id(p): g["lr"] for g in lr.param_groups for p in g["params"]}
            missing = [self.layer_names[i] for i in idx if id(self._layers[i].weight) not in of]
            if missing:
                raise ValueError(f"lr: the optimizer given as lr= does not update the weights of {missing}")
            lrs = [of[id(self._layers[i].weight)] for i in idx]
        else:
            lrs = [lr() if callable(lr) else lr] * len(idx)
        lrs = [float(V.nonnegative("lr", v)) for v in lrs]
        return lrs

    def _micro_batch_starts(self) -> None:
        """Before micro-batch j's forward: IFANG's row groups span the global batch of
        world x accumulation_steps micro-batches (micro-batch j of rank r is its (r k + j)-th
        block), so this pass yields its share of every group mean (see _fold_micro_batches)."""
        col, k = self._collector, self.accumulation_steps
        if col is not None and self.method == "ifang" and k > 1:
            r, world = self._shard
            col.shard = (r * k + min(self._forwards, k - 1), world * k)
        self._forwards += 1

    def _fold_micro_batches(self, states: List[dict], ready: List[int]) -> List[torch.Tensor]:
        """IFANG with k micro-batches: the collector stacks the k passes' shares of the s' group
        means as k s' rows, each scaled by 1/sqrt(k s'); the group means of the concatenated
        batch are the average of the shares, i.e. YA = sum_j rows_j / sqrt(k) (likewise YG).
        Returns the new factors."""
        k, out = self.accumulation_steps, []
        for i in ready:
            for key in LowRankKronecker.STATE:
                y = states[i][key]
                states[i][key] = (y.reshape(k, -1, y.shape[1]).sum(0) / math.sqrt(k)).contiguous()
                out.append(states[i][key])
        return out

    def _check_micro_batches(self) -> None:
        if self._forwards != self.accumulation_steps:
            raise RuntimeError(f"KFACPreconditioner.step(): accumulation_steps={self.accumulation_steps} but "
                               f"{self._forwards} training forward passes with grad enabled ran since the last "
                               "step (run exactly accumulation_steps micro-batches, forward and backward, per "
                               "step(); evaluate under torch.no_grad() or model.eval())")

    def _skip(self, what: str) -> bool:
        self._collector.clear()
        self._forwards = 0
        if self.raise_on_nonfinite:
            raise NonFiniteError(f"KFACPreconditioner: non-finite values in {what}; nothing changed")
        self.counters["skipped_steps"] += 1
        return False

    @torch.no_grad()
    def step(self) -> bool:
        """Replace the preconditioned layers' ``.grad`` by their directions (in place). Call it
        after the backward pass(es) and before ``optimizer.step()``. Returns True, or False when
        non-finite values made it skip (nothing changed)."""
        col = self._collector
        if col is None:
            raise RuntimeError("KFACPreconditioner has no hooks (remove_hooks() was called)")
        self._check_settings(self._settings())  # attributes may have been edited
        self._check_micro_batches()
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            raise RuntimeError("KFACPreconditioner.step(): no parameter has a gradient; run loss.backward() first")
        if any(g.is_sparse for g in grads):
            raise RuntimeError("KFACPreconditioner.step(): sparse gradients are not supported")
        if self.grad_scaler is not None and self.grad_scaler.is_enabled() and not _unscaled(self.grad_scaler):
            raise RuntimeError("KFACPreconditioner.step(): the gradients are still scaled by grad_scaler; call "
                               "scaler.unscale_(optimizer) before precond.step()")
        lam = float(self._lam_fn(self.counters["steps"])) if self._lam_fn is not None else 0.0
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam_schedule returned {lam!r} at step {self.counters['steps']}; must be in [0, 1]")
        if not self._finite(grads):
            return self._skip("gradients")

        # work on copies of the updated layers' state: committed only when everything is finite
        ready = [i for i in range(len(self._layers)) if col.ready(i)] if self._due(self.cov_every) else []
        states = [({k: v.clone() for k, v in st.items()} if i in ready else dict(st))
                  for i, st in enumerate(self._states)]
        fresh = self.curvature.update(self._layers, states, col, ready, self.fused) if ready else []
        if ready and self.method == "ifang" and self.accumulation_steps > 1:
            fresh = self._fold_micro_batches(states, ready)
        if fresh and self.process_group is not None:  # after the EMA: the factors of the global batch
            for t, avg in zip(fresh, distributed.all_reduce_mean(fresh, self.process_group)):
                t.copy_(avg)
        have = [i for i, st in enumerate(states) if self.curvature.has_statistics(st)]
        per_factor = self.factor_damping if self.factor_damping is not None else math.sqrt(self.damping)
        lams = [float(per_factor)] * len(self._layers)
        refreshed = self.curvature.refresh(states, have, lams, self.counters["steps"])
        pre = [i for i in have if self._layers[i].weight.grad is not None]
        nat, coefficients = [], None
        if pre:
            ts = []
            for i in pre:
                layer = self._layers[i]
                gb = None
                if layer.bias is not None:
                    gb = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
                ts.append(layer.grad_matrix(layer.weight.grad, gb, accumulation_dtype(layer.weight)))
            nat, red = self.curvature.precondition(ts, [states[i] for i in pre], [lams[i] for i in pre], self.fused)
            scale = kl_clip_scale(red[:, 0], self._layer_lrs(pre), self.kl_clip) if self.kl_clip else None
            if self.method == "kfac":
                if scale is not None:
                    torch._foreach_mul_(nat, scale.to(nat[0].dtype))
            else:
                coefficients = ops.ang_combine_(nat, ts, red, scale, lam, self.per_layer, fused=self.fused)
        new_state = [t for i in set(ready) | (set(have) if refreshed else set()) for t in states[i].values()]
        if not self._finite(list(nat) + new_state):
            return self._skip("factors or directions")

        # commit
        self._states = states
        for i, u in zip(pre, nat):
            layer = self._layers[i]
            w, b = layer.split(u)
            layer.weight.grad.copy_(w)
            if b is not None and layer.bias.grad is not None:
                layer.bias.grad.copy_(b)
        if coefficients is not None:
            self.last_coefficients = coefficients
        self.counters["factor_updates"] += bool(ready)
        self.counters["inverse_updates"] += bool(refreshed)
        self.counters["steps"] += 1
        col.clear()
        col.collecting = self._due(self.cov_every)
        self._forwards = 0
        return True

    def _finite(self, tensors: List[torch.Tensor]) -> bool:
        """One host sync: True when every element of ``tensors`` is finite."""
        return not tensors or bool(torch.isfinite(ops.global_norm(tensors, fused=self.fused)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The factors of each layer (in layer order), counters and settings (plain types)."""
        return {"method": self.method, "rank": self.rank, "counters": dict(self.counters),
                "settings": self._settings(),
                "layers": [{k: v.clone() for k, v in st.items()} for st in self._states]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; checks everything first, then loads all of it or nothing."""
        if not isinstance(state_dict, dict) or not {"method", "counters", "settings", "layers"} <= set(state_dict):
            raise ValueError("KFACPreconditioner.load_state_dict: not a KFACPreconditioner state_dict (needs method, "
                             "counters, settings and layers)")
        if state_dict["method"] != self.method or state_dict.get("rank") != self.rank:
            raise ValueError(f"KFACPreconditioner.load_state_dict: saved by method={state_dict['method']!r} "
                             f"rank={state_dict.get('rank')!r}; this preconditioner has method={self.method!r} "
                             f"rank={self.rank!r}")
        saved = state_dict["layers"]
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self._layers):
            raise ValueError(f"KFACPreconditioner.load_state_dict: {len(saved) if isinstance(saved, (list, tuple)) else 'no'}"
                             f" layers saved, this preconditioner has {len(self._layers)} ({self.layer_names})")
        allowed = self.curvature.STATE
        for layer, st in zip(self._layers, saved):
            a, g = layer.a_dim, layer.out_features
            want = {"kfac_A": (a, a), "kfac_A_inv": (a, a), "kfac_G": (g, g), "kfac_G_inv": (g, g),
                    "kfac_YA": (None, a), "kfac_YG": (None, g)}
            for k, v in st.items():
                if k not in allowed:
                    raise ValueError(f"KFACPreconditioner.load_state_dict: layer {layer.name}: unknown state {k!r} "
                                     f"(method {self.method!r} keeps {allowed})")
                if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() != 2 or \
                        any(w is not None and w != n for w, n in zip(want[k], v.shape)):
                    raise ValueError(f"KFACPreconditioner.load_state_dict: layer {layer.name}: state {k!r} must be a "
                                     f"floating-point tensor of shape {want[k]} (None: any), got "
                                     f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"KFACPreconditioner.load_state_dict: layer {layer.name}: state {k!r} is not finite")
        counters = state_dict["counters"]
        if not isinstance(counters, dict) or set(counters) != set(self.COUNTERS) or \
                any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters.values()):
            raise ValueError(f"KFACPreconditioner.load_state_dict: counters must hold the ints {self.COUNTERS}")
        settings = dict(state_dict["settings"])
        if set(settings) != set(self._settings()):
            raise ValueError(f"KFACPreconditioner.load_state_dict: settings must hold {sorted(self._settings())}, "
                             f"got {sorted(settings)}")
        try:
            self._check_settings(settings)
        except (TypeError, ValueError) as e:
            raise type(e)(f"KFACPreconditioner.load_state_dict: {e}") from None
        # everything checked: load
        self._states = [{k: v.to(device=l.weight.device, dtype=accumulation_dtype(l.weight), copy=True)
                         for k, v in st.items()} for l, st in zip(self._layers, saved)]
        self.counters = dict(counters)
        for k, v in settings.items():
            setattr(self, k, v)
        self._forwards = 0
        if self._collector is not None:
            self._collector.clear()
            self._collector.collecting = self._due(self.cov_every)
