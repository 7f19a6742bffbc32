"""K-FAC, the asymptotic natural gradient (ANG) and its inverse-free form (IFANG): one family
of optimizers, each a curvature strategy of :mod:`natasha_ext.curvature.kronecker` combined with
a direction rule.

==========  =====================================================  ==================================
class       curvature (Kronecker factors A (x) G of the Fisher)    direction
==========  =====================================================  ==================================
KFAC        DenseKronecker: EMA factors, damped inverses            natural gradient U
ANG         DenseKronecker                                          spherical blend of U and T (eq. 7)
IFANG       LowRankKronecker: minibatch YA, YG, Sherman-Morrison-   spherical blend of U and T (eq. 7)
            Woodbury
==========  =====================================================  ==================================

Papers: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature" (2015) for K-FAC; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix
for convolution layers" (2016) for convolutions; Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang,
"AsymptoticNG: a regularized natural gradient optimization algorithm with look-ahead strategy"
(2021), eqs. 1-14 and Algorithms 1-2, for ANG and IFANG.

Per supported layer (``nn.Linear``, ``nn.Conv1d/2d/3d``; grouped convs, ``nn.Embedding`` and the
affine parameters of norm layers by :mod:`natasha_ext.curvature.kfac_blocks`; the table is in
:mod:`natasha_ext.curvature.kfac_layers`) the gradient is the matrix T = [dW | db]
(out x in[+1]). The Fisher block is approximated by A (x) G with A = E[a a^T] (layer inputs with
a bias column) and G = E[g g^T] (per-example pre-activation gradients), collected by hooks
(:mod:`natasha_ext.curvature.kfac_factors`). Which Fisher: ``fisher='mc'`` (KFAC's default, Martens &
Grosse 2015: targets sampled from the model), ``'type2'`` (exact GGN factor) or ``'empirical'``
(observed targets; ANG's and IFANG's default, Tang et al.'s eqs. 9-10); see
:mod:`natasha_ext.curvature.fisher`. Every member adds one damping lam to
each factor (Tang et al.'s eqs. 8-13), so the preconditioned gradient is

    U = (G + lam I)^-1 T (A + lam I)^-1  (= ((A + lam I) (x) (G + lam I))^-1 vec T).

lam is given in one of two forms (one per param group, the other None; ``factor_damping``, when
given, replaces ``damping``):
``factor_damping`` is lam itself (the ANG paper's damping, the ANG/IFANG default);
``damping`` is Martens & Grosse's damping gamma of the whole Kronecker block, applied as factored
Tikhonov damping (Martens & Grosse 2015, Sec. 6.3, pi = 1) with lam = sqrt(gamma) per factor, so
that (A + lam I) (x) (G + lam I) = A (x) G + gamma I + lam (A (x) I + I (x) G) (the KFAC default;
the block is *not* A (x) G + gamma I, which K-FAC never inverts). With lam per factor a
direction the factors do not see (inputs that are always zero, the n - s' directions of
IFANG's rank-s' factors) is damped by lam^2 = gamma.

Step (Tang et al.'s Algorithm 2, line 9, for ANG/IFANG's defaults): p <- p - lr d. Two opt-in
K-FAC practices (on by default for KFAC only, see :meth:`practical` for ANG/IFANG):
``kl_clip``: d <- nu d with nu = min(1, sqrt(kl_clip / sum_l lr_l^2 d_l^T F_l d_l)), the KL
estimate of the step actually taken (Ba, Grosse & Martens, "Distributed second-order optimization
using Kronecker-factored approximations", 2017): for KFAC d = U, so d^T F d = t^T F^-1 t =
<U, T> exactly (F: the damped Kronecker block whose inverse gave U); for ANG/IFANG's blend
d = c1 U + c2 T it is measured as <(G + lam I) d, d (A + lam I)> with the current factors
(:meth:`DenseKronecker.quadratic_form`; the same F as U's when the inverses are refreshed every
step, the ANG default). ``momentum``: heavy-ball buf <- momentum buf + d; p <- p - lr buf.
ANG's and IFANG's direction is the spherical interpolation of Tang et al.'s eq. 7,

    d = ||t||_G ( sin((1-lam)W)/sin W * U/||t||_G + sin(lam W)/sin W * T/||t|| ),
    cos W = t^T G^-1 t / (||t||_G ||t||),

with ||t||_G read as ||G^-1 t|| (the only reading under which W is the angle between the two
directions and the blend has unit norm before the amplitude, as the paper states), lam going
from 0 (natural gradient) toward 1 (Euclidean direction with the natural gradient's amplitude)
by ``lam_schedule`` (:mod:`natasha_ext.optim.lambda_schedules`); eq. 7's fallback uses the plain
gradient when t^T G^-1 t <= 0. IFANG's low-rank factors make Algorithm 1's "M >= n" branch (a
dense inverse when the layer is narrower than s') unnecessary: the SMW form is exact for every n.

Parameters of modules that cannot be preconditioned (other module types, sparse embeddings,
``skip_layers``) take the SGD-momentum update with the same lr, momentum and weight decay; they
are listed in ``repr(opt)``, ``opt.fallback`` and ``opt.fallback_names`` (unskipped ones in a
warning at construction). Weight decay is
added to the gradient before preconditioning (the natural gradient of the L2-regularised loss).

``model_or_params``: an ``nn.Module`` (all its trainable parameters, one group), or an iterable
of parameters / param groups together with ``model=`` (the module whose supported layers are
hooked: every layer whose weight is among the parameters is preconditioned; a layer's weight and
bias must share a group). Modules that share a weight (weight tying) are one layer, named
"first+second", whose factors come from the statistics of all their calls, as for a module called
several times (they must share the bias too; otherwise construction fails naming both).
Hyperparameters lr, momentum, damping, factor_damping, weight_decay are read per group at every step (LR schedulers work; the paper's milestone decay of
lr is ``torch.optim.lr_scheduler.MultiStepLR``).

Usage (the usual K-FAC workflow: the forward and backward passes feed the hooks)::

    opt = KFAC(model, lr=0.01)         # or ANG(model), ANG.practical(model), IFANG(model)
    loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

``step(closure)`` also works: ``closure()`` returns the loss without calling backward and the
optimizer differentiates it (setting ``.grad``), or it calls backward itself (torch.optim's
convention, PyTorch Lightning's automatic optimization) and the hooks see that pass.
Statistics are captured only in forward passes
run with grad enabled while ``opt.collecting`` is True (on steps that are multiples of
``cov_every``), and they must be followed by a backward pass before ``step()``.

Hooks: ``opt.remove_hooks()`` unregisters them (also done when the optimizer is garbage
collected). A deep-copied or unpickled optimizer has no hooks until ``opt.attach(model)``.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import List, Optional

import torch
import torch.nn as nn

from natasha_ext import ops
from natasha_ext.curvature.hvp import called_backward, evaluate_closure, gradients
from natasha_ext.curvature.fisher import check_fisher_args
from natasha_ext.curvature.kfac_blocks import LayerwiseCurvature
from natasha_ext.curvature.kfac_factors import FactorCollector, find_layers
from natasha_ext.curvature.kfac_layers import check_skip_layers
from natasha_ext.curvature.kronecker import INVERSES, DenseKronecker, LowRankKronecker
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NatashaOptimizer, shared_args_doc
from natasha_ext.optim.lambda_schedules import DEFAULT_TIME_CONSTANT, LAMBDA_SCHEDULES, lambda_schedule
from natasha_ext.precision import accumulation_dtype

__all__ = ["KFAC", "ANG", "IFANG", "lambda_schedule", "LAMBDA_SCHEDULES"]

#: Tang et al. 2021, Sec. 3.1: SGD starts at lr 0.01, "while that of other methods was set to 0.005"
PAPER_LR = 0.005
#: lam added to each factor (eq. 8) by default. The paper states no value: ANG's is the per-factor
#: lam = sqrt(1e-3) of K-FAC's default damping, rounded; IFANG's rank-1 factors leave all but one
#: direction damped by lam alone, so it needs more (on LeNet-5/Fashion-MNIST with the paper's
#: plain step at lr 0.005, lam <= 0.1 diverged for IFANG, 0.2-0.3 trained; ANG trained for
#: 0.003-0.1 and diverged at 1e-3).
ANG_FACTOR_DAMPING = 0.03
IFANG_FACTOR_DAMPING = 0.3


def _reached_leaves(loss: torch.Tensor) -> set:
    """The leaf tensors ``loss``'s autograd graph reaches (walks grad_fn -> AccumulateGrad)."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _remove_handles(collector_box):
    col = collector_box[0] if collector_box else None
    if col is not None:
        col.remove()


class _KroneckerFamily(NatashaOptimizer):
    """Hooks, KL clipping, momentum and the step of every member; ``self.curvature`` (a strategy
    of :mod:`natasha_ext.curvature.kronecker`) supplies the factors and U, :meth:`_direction`
    turns U into the step direction."""

    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps", "factor_updates", "inverse_updates")
    ACCUMULATION_STATE = DenseKronecker.STATE + LowRankKronecker.STATE + LayerwiseCurvature.STATE + ("momentum_buffer",)

    #: the factor_damping used when neither ``damping`` nor ``factor_damping`` is given (None: one must be)
    DEFAULT_FACTOR_DAMPING: Optional[float] = None

    def __init__(self, model_or_params, curvature, *, lr: float, momentum: float, damping: Optional[float],
                 factor_damping: Optional[float], weight_decay: float, kl_clip: Optional[float], cov_every: int,
                 model: Optional[nn.Module],
                 batch_averaged: bool, grad_scaler, fused: Optional[bool], seed: Optional[int],
                 raise_on_nonfinite: bool, process_group, fisher: str = "mc", likelihood: str = "categorical",
                 mc_samples: int = 1, skip_layers=None):
        check_fisher_args(fisher, likelihood, mc_samples)
        skip_layers = check_skip_layers(skip_layers)
        if isinstance(model_or_params, nn.Module):
            if model is not None and model is not model_or_params:
                raise ValueError("model= given together with a different nn.Module as model_or_params")
            model = model_or_params
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            if model is None:
                raise TypeError(f"{type(self).__name__} needs the model to hook its layers: pass the nn.Module as "
                                "the first argument, or params/param groups together with model=")
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
            params = model_or_params
        defaults = dict(lr=lr, momentum=momentum, damping=damping, factor_damping=factor_damping,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite)
        self.curvature = LayerwiseCurvature(curvature)
        self.fisher, self.likelihood, self.mc_samples = fisher, likelihood, int(mc_samples)
        self.skip_layers = skip_layers
        self.kl_clip = None if not kl_clip else float(kl_clip)
        self.cov_every = int(cov_every)
        self.batch_averaged = bool(batch_averaged)
        self._grad_scaler = grad_scaler
        self._box = [None]
        self.layer_names: List[str] = []
        self.fallback_names: List[str] = []
        self.attach(model)
        unsupported = [n for n in self.fallback_names if not n.endswith("(skipped: skip_layers)")]
        if unsupported:
            warnings.warn(f"{type(self).__name__}: not K-FAC preconditioned (SGD-momentum update): {unsupported}; see "
                          "opt.fallback, or pass skip_layers= to choose this explicitly", UserWarning, stacklevel=3)
        if process_group is not None:
            self.set_process_group(process_group)

    @classmethod
    def _practical_kwargs(cls, overrides: dict) -> dict:
        """:attr:`PRACTICAL` (EMA factors refreshed every 10 steps, inverses every 100,
        factored-Tikhonov damping, KL clip, momentum 0.9) under ``overrides``; an explicit
        per-factor ``factor_damping`` replaces the preset's gamma."""
        kwargs = dict(cls.PRACTICAL)
        if overrides.get("factor_damping") is not None:
            kwargs.pop("damping", None)
        return {**kwargs, **overrides}

    @classmethod
    def _check_group(cls, group: dict) -> None:
        V.nonnegative("lr", group["lr"])
        V.in_range("momentum", group["momentum"], 0.0, 1.0)
        for key in ("damping", "factor_damping"):
            if group.get(key) is not None:
                V.positive(key, group[key])
        if (group.get("damping") is None) == (group.get("factor_damping") is None):
            raise ValueError(f"exactly one of damping (gamma of the Kronecker block, sqrt(gamma) per factor) and "
                             f"factor_damping (lam added to each factor) must be set, got damping="
                             f"{group.get('damping')!r}, factor_damping={group.get('factor_damping')!r}")
        V.nonnegative("weight_decay", group["weight_decay"])

    @classmethod
    def _resolve_damping(cls, damping, factor_damping):
        """(damping, factor_damping): factor_damping, when given, replaces damping; the class's
        DEFAULT_FACTOR_DAMPING when neither is given."""
        if factor_damping is None and damping is None:
            factor_damping = cls.DEFAULT_FACTOR_DAMPING
        return (None, factor_damping) if factor_damping is not None else (damping, None)

    @classmethod
    def _check_common(cls, lr, momentum, damping, factor_damping, weight_decay, kl_clip, cov_every) -> None:
        cls._check_group(dict(lr=lr, momentum=momentum, damping=damping, factor_damping=factor_damping,
                              weight_decay=weight_decay))
        if kl_clip is not None:
            V.nonnegative("kl_clip", kl_clip)
        V.positive_int("cov_every", cov_every)

    def add_param_group(self, param_group: dict) -> None:
        # a group naming one damping form uses that form (not the other one from the defaults)
        if isinstance(param_group, dict) and "defaults" in self.__dict__:
            for key, other in (("damping", "factor_damping"), ("factor_damping", "damping")):
                if param_group.get(key) is not None and other not in param_group:
                    param_group = {**param_group, other: None}
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict) -> None:
        # checkpoints from before factor_damping existed hold damping only
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and any(isinstance(g, dict) and "factor_damping" not in g for g in groups):
            state_dict = dict(state_dict, param_groups=[dict(g, factor_damping=None) if isinstance(g, dict) and
                                                        "factor_damping" not in g else g for g in groups])
        super().load_state_dict(state_dict)

    def _state_shape(self, p: torch.Tensor, key: str):
        layer = {id(l.weight): l for l in getattr(self, "_layers", ())}.get(id(p)) if key.startswith("kfac_") else None
        if layer is None:
            return super()._state_shape(p, key)
        a, g = layer.a_dim, layer.out_features
        return {"kfac_A": (a, a), "kfac_A_inv": (a, a), "kfac_G": (g, g), "kfac_G_inv": (g, g),
                "kfac_YA": (-1, a), "kfac_YG": (-1, g)}.get(key)

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """(Re-)register the hooks on ``model``'s supported layers whose weights this optimizer
        updates (after a deepcopy/unpickle, or to move to another copy of the model)."""
        self.remove_hooks()
        owned = {p: gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        layers, fallback = find_layers(model, owned, getattr(self, "skip_layers", ()))
        if not layers:
            raise ValueError(f"{type(self).__name__}: the model has no supported layer (Linear, Conv1d/2d/3d, Embedding, "
                             "norm) whose "
                             f"weight is among the optimizer's parameters; nothing to precondition "
                             f"(unsupported: {fallback or 'no layers with parameters'})")
        dtypes = sorted({str(accumulation_dtype(l.weight)) for l in layers})
        if self.fused and len(dtypes) > 1:
            raise ValueError(f"{type(self).__name__}: fused=True needs the preconditioned layers in one precision, got "
                             f"{dtypes}; use fused=None (the reference takes mixed fp32/fp64 layers)")
        self._layers = layers
        self._layer_group = [owned[l.weight] for l in layers]
        self.layer_names, self.fallback_names = [l.name or "<root>" for l in layers], fallback
        #: {layer name: its block} and {module name: why it takes the SGD-momentum update}, to print
        self.preconditioned = {l.name or "<root>": l.describe() for l in layers}
        self.fallback = dict(f[:-1].split(" (", 1) for f in fallback)
        ref = weakref.ref(self)
        col = FactorCollector(layers, mode=self.curvature.collector_mode, rank=self.curvature.rank,
                              batch_averaged=self.batch_averaged, grad_scaler=getattr(self, "_grad_scaler", None),
                              fisher=self.fisher, likelihood=self.likelihood, mc_samples=self.mc_samples, model=model,
                              seed_fn=lambda: (ref().rng.seed, int(ref().counters["steps"])))
        col.collecting = self._due(self.cov_every)
        col.shard = self._shard()
        self._box = [col]
        self._finalizer = weakref.finalize(self, _remove_handles, self._box)

    def _shard(self):
        """(rank, world size) of this process in the optimizer's group ((0, 1) without one)."""
        group = self.process_group
        if group is None:
            return (0, 1)
        import torch.distributed as dist

        return (dist.get_rank(group), dist.get_world_size(group))

    def set_process_group(self, group) -> None:
        super().set_process_group(group)
        col = self._collector
        if col is not None:  # IFANG's row groups are laid out over the global batch
            col.shard = self._shard()

    def remove_hooks(self) -> None:
        """Unregister every hook this optimizer placed on the model."""
        box = getattr(self, "_box", None)
        if box and box[0] is not None:
            box[0].remove()
            box[0] = None

    @property
    def _collector(self) -> Optional[FactorCollector]:
        box = getattr(self, "_box", None)
        return box[0] if box else None

    @property
    def collecting(self) -> bool:
        col = self._collector
        return bool(col and col.collecting)

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch's load_state_dict also calls __setstate__ (partial dict): keep live hooks then;
        # after deepcopy/unpickle there are none, and attach(model) re-registers them
        if "_box" not in self.__dict__:
            self._box = [None]

    def __repr__(self):
        base = super().__repr__()
        return (f"{base[:-1]}K-FAC layers ({len(self.layer_names)}): {', '.join(self.layer_names)}\n"
                f"SGD fallback ({len(self.fallback_names)}): {', '.join(self.fallback_names) or '-'}\n)")

    # ------------------------------------------------------------------ state
    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        col = self._collector
        if col is not None:  # the restored step counter decides whether the next pass collects
            col.collecting = self._due(self.cov_every)

    # ------------------------------------------------------------------ curvature
    def _due(self, every: int) -> bool:
        return int(self.counters["steps"]) % every == 0

    def _layer_states(self) -> List[dict]:
        return [self.state[layer.weight] for layer in self._layers]

    def _average_across_ranks(self, tensors: List[torch.Tensor]) -> None:
        """In place: average ``tensors`` over the process group (one bucketed all-reduce per
        dtype; identical contents on every rank afterwards). No-op without a group."""
        if self.process_group is None or not tensors:
            return
        for t, avg in zip(tensors, self.reduce_mean(tensors)):
            t.copy_(avg)

    def _factor_damping(self, i: int) -> float:
        """The lam added to each factor of layer i: its group's factor_damping, else sqrt(damping)
        (factored Tikhonov)."""
        group = self.param_groups[self._layer_group[i]]
        if group.get("factor_damping") is not None:
            return float(group["factor_damping"])
        return math.sqrt(float(group["damping"]))

    def _prepare(self, ready: List[int]) -> List[int]:
        """Update the statistics and inverses as scheduled; return the layers that can be
        preconditioned."""
        states = self._layer_states()
        if ready and self._due(self.cov_every):
            # after the update: every rank then holds the factors of the global batch
            self._average_across_ranks(self.curvature.update(self._layers, states, self._collector, ready,
                                                             self.fused))
            self.counters["factor_updates"] += 1
        have = [i for i, st in enumerate(states) if self.curvature.has_statistics(st)]
        lams = [self._factor_damping(i) for i in range(len(states))]
        if self.curvature.refresh(states, have, lams, int(self.counters["steps"])):
            self.counters["inverse_updates"] += 1
        return have

    def _precondition(self, idx: List[int], ts: List[torch.Tensor]):
        """(U list, [L, 3] reductions) for the layers idx."""
        return self.curvature.precondition(ts, [self.state[self._layers[i].weight] for i in idx],
                                           [self._factor_damping(i) for i in idx], self.fused)

    def _direction(self, nat, ts, red) -> None:
        """The step direction d, in place of U in ``nat``: K-FAC's is U itself."""

    def _step_curvature(self, idx: List[int], nat: List[torch.Tensor], red: torch.Tensor) -> torch.Tensor:
        """[L] d_l^T F_l d_l of the directions in ``nat``: for d = U it is <U, T> = t^T F^-1 t
        (reductions column 0), with F exactly the damped block whose inverse gave U."""
        return red[:, 0]

    def _kl_scale(self, idx: List[int], quad: torch.Tensor) -> torch.Tensor:
        """nu = min(1, sqrt(kl_clip / sum_l lr_l^2 d_l^T F_l d_l)) as a 0-dim tensor (1 when the
        sum is not positive) from ``quad`` = [L] d_l^T F_l d_l."""
        lrs = [float(self.param_groups[self._layer_group[i]]["lr"]) for i in idx]
        if all(lr == lrs[0] for lr in lrs):  # one lr (the usual case): no host-to-device copy
            vg = quad.sum() * lrs[0] ** 2
        else:
            lr2 = torch.tensor([lr ** 2 for lr in lrs], dtype=quad.dtype).to(quad.device, non_blocking=True)
            vg = (quad * lr2).sum()
        nu = torch.sqrt(self.kl_clip / vg.clamp_min(torch.finfo(quad.dtype).tiny)).clamp(max=1.0)
        return torch.where(torch.isfinite(vg) & (vg > 0), nu, torch.ones_like(nu))

    def _clip(self, idx: List[int], nat: List[torch.Tensor], scale: torch.Tensor) -> None:
        """d <- nu d (the KL clip)."""
        torch._foreach_mul_(nat, scale.to(nat[0].dtype))

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        if self._collector is None:
            raise RuntimeError(f"{type(self).__name__} has no hooks (removed, or this optimizer was copied/"
                               "unpickled): call opt.attach(model) first")
        loss = None
        params = [p for g in self.param_groups for p in g["params"]]
        col = self._collector
        if closure is not None:
            # the statistics are those of the closure's forward/backward, whatever passes the
            # model ran since the last step
            col.clear()
            loss = evaluate_closure(closure)
            live = [p for p in params if p.requires_grad]
            # the leaves the loss reaches (a closure that called backward: those it wrote .grad to)
            reached = {p for p in live if p.grad is not None} if called_backward(loss) else _reached_leaves(loss)
            with torch.enable_grad():  # the engine may scale the loss (AMP): keep the graph
                gs = gradients(loss, live)
            for p, g in zip(live, gs):
                # as after loss.backward(): parameters the loss does not reach keep grad None
                # (no weight decay, no momentum for them)
                p.grad = g if p in reached else None
            loss = loss.detach()
        self.check_grads(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            if closure is None:
                raise self.no_closure_no_gradients("run forward and loss.backward() before step()")
            return loss
        self.counters["gradients"] += 1
        if not self.all_finite(grads):
            col.clear()
            self.skip_nonfinite("gradients")
            return loss

        ready = [i for i in range(len(self._layers)) if col.ready(i)]
        if col.collecting:
            self._warn_missing_statistics(ready)
        # the optimizer's algebra (factors, inverses, products) stays in the statistics' dtypes when
        # step() runs inside the user's autocast region (only the closure's forward is autocast)
        with torch.autocast(grads[0].device.type, enabled=False):
            self._update(col, ready)
        self.counters["steps"] += 1
        col.collecting = self._due(self.cov_every)
        return loss

    def _update(self, col, ready: List[int]) -> None:
        """Statistics and inverses as scheduled, then the preconditioned (blended, clipped) step."""
        have = self._prepare(ready)
        col.clear()
        # layers whose weight has a gradient and that have curvature statistics
        pre = [i for i in have if self._layers[i].weight.grad is not None]
        directions = {}
        if pre:
            ts = []
            for i in pre:
                layer = self._layers[i]
                wd = float(self.param_groups[self._layer_group[i]]["weight_decay"])
                dt = accumulation_dtype(layer.weight)
                gb = None
                if layer.bias is not None:
                    gb = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
                t = layer.grad_matrix(layer.weight.grad, gb, dt)
                if wd:
                    t = t + wd * layer.grad_matrix(layer.weight, layer.bias, dt)
                ts.append(t)
            nat, red = self._precondition(pre, ts)
            self._direction(nat, ts, red)
            if self.kl_clip is not None:  # the clip of the step taken
                self._clip(pre, nat, self._kl_scale(pre, self._step_curvature(pre, nat, red)))
            for i, u in zip(pre, nat):
                layer = self._layers[i]
                w, b = layer.split(u)
                directions[layer.weight] = w
                if b is not None:
                    directions[layer.bias] = b
        self._apply(directions)

    def _warn_missing_statistics(self, ready: List[int]) -> None:
        """Say once when layers with a gradient got no statistics on a statistics step (their
        forward ran without grad, or the backward did not pass through their hooked outputs):
        they keep their old factors (or take the SGD-momentum update before the first ones)."""
        missing = [self.layer_names[i] for i, l in enumerate(self._layers)
                   if i not in ready and l.weight.grad is not None]
        if missing and not getattr(self, "_warned_missing", False):
            self._warned_missing = True
            warnings.warn(f"{type(self).__name__}: no K-FAC statistics were captured for {missing} this step (their "
                          "forward ran without grad or no backward pass reached their outputs); pass the forward "
                          "pass as step(closure) or run forward and backward before step(). Said once.",
                          RuntimeWarning, stacklevel=3)

    def _apply(self, directions) -> None:
        """Momentum and the parameter update; parameters without a preconditioned direction
        (fallback layers, layers without statistics yet) take their (weight-decayed) gradient."""
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = directions.get(p)
                if d is None:
                    acc = accumulation_dtype(p)
                    d = p.grad.to(acc)
                    if wd:
                        d = d + wd * p.to(acc)
                st = self.state[p]
                if mom:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = d.clone().contiguous()
                    else:
                        buf.mul_(mom).add_(d)
                    d = buf
                if p.dtype == d.dtype:
                    p.add_(d, alpha=-lr)
                else:
                    p.copy_(p.to(d.dtype) - lr * d)


@shared_args_doc
class KFAC(_KroneckerFamily):
    """K-FAC with damped Kronecker inverses, KL clipping and momentum (see the module docstring).

    Martens & Grosse (2015) adapt the damping (a Levenberg-Marquardt rule, Sec. 6), the step size
    and the momentum (from the exact-Fisher quadratic model, Sec. 7) as they go; this class takes
    them as fixed hyperparameters with the values of the usual fixed-hyperparameter K-FAC (and
    the KL clip of Ba, Grosse & Martens 2017). Where Martens & Grosse state a number it is noted;
    README's 'Defaults and the papers' table lists every default beside its source.

    Args:
        model_or_params: nn.Module, or params / param groups together with ``model=``.
        lr (0.01), momentum (0.9),
        damping (1e-3): gamma of the Kronecker block, applied as factored Tikhonov damping
        (Martens & Grosse Sec. 6.3, pi = 1): lam = sqrt(gamma) is added to each factor,
        stat_decay (0.95: Martens & Grosse's EMA decay, Sec. 5, min(1 - 1/k, 0.95) after its
        warm-up; here the first update starts the average), weight_decay (0),
        kl_clip (1e-3; None or 0 disables), cov_every (10: statistics every 10 steps; Martens &
        Grosse collect them every step), inv_every (100: inverses every 100 steps; Martens & Grosse
        recompute them every T3 steps, Sec. 8, 20 in their experiments), inverse ('cholesky' | 'eigh').
        factor_damping (None): lam added to each factor directly (Tang et al.'s eq. 8); when given
        it replaces ``damping``.
        batch_averaged (True): the loss is a mean over the batch (per-example gradients are
        grad_output * B). grad_scaler: a GradScaler under AMP (its scale is divided out of G).
        fisher ('mc'): the Fisher the factors G (and the norm layers' elementwise Fisher) describe:
        'mc' (default; Martens & Grosse 2015, Sec. 5: ``mc_samples`` targets drawn from the model's
        predictive distribution), 'type2' (the exact
        generalized Gauss-Newton factor, one backward per output column of the loss Hessian's
        square root) or 'empirical' (the training loss's gradients at the observed targets);
        :mod:`natasha_ext.curvature.fisher`. 'mc' and 'type2' run their extra backward passes from
        the model's output at the end of each statistics-collecting forward pass (``.grad`` is
        untouched); the model's forward must return that output as one tensor.
        likelihood ('categorical'): the output's distribution for 'mc' / 'type2': 'categorical'
        (logits on dim 1, as F.cross_entropy takes them) or 'gaussian' (per example
        sum (f - y)^2, as F.mse_loss(reduction='sum')). mc_samples (1): targets per example ('mc').
        skip_layers (None): modules to leave to the SGD-momentum update: names (exact or regular
        expressions, full match), compiled patterns, or nn.Module types. ``opt.preconditioned``
        ({name: block}) and ``opt.fallback`` ({name: why}) report the split; a module that cannot
        be preconditioned and is not skipped is named in a warning at construction.
        {shared_args}

    Distributed (``process_group``): the gradients are averaged by the shared engines; the factor
    statistics of all layers are averaged in one bucketed all-reduce per statistics refresh (per
    dtype), after the EMA, so every rank holds the factors of the global batch (equal shards).
    """

    PRACTICAL = dict(lr=0.01, momentum=0.9, damping=1e-3, stat_decay=0.95, kl_clip=1e-3, cov_every=10,
                     inv_every=100)

    def __init__(self, model_or_params, lr: float = 0.01, momentum: float = 0.9, damping: Optional[float] = 1e-3,
                 stat_decay: float = 0.95, weight_decay: float = 0.0, kl_clip: Optional[float] = 1e-3,
                 cov_every: int = 10, inv_every: int = 100, inverse: str = "cholesky", *,
                 factor_damping: Optional[float] = None,
                 model: Optional[nn.Module] = None, batch_averaged: bool = True, grad_scaler=None,
                 fused: Optional[bool] = None, seed: Optional[int] = None, raise_on_nonfinite: bool = False,
                 process_group=None, fisher: str = "mc", likelihood: str = "categorical", mc_samples: int = 1,
                 skip_layers=None):
        damping, factor_damping = self._resolve_damping(damping, factor_damping)
        self._check_common(lr, momentum, damping, factor_damping, weight_decay, kl_clip, cov_every)
        V.in_range("stat_decay", stat_decay, 0.0, 1.0)
        V.positive_int("inv_every", inv_every)
        V.choice("inverse", inverse, INVERSES)
        super().__init__(model_or_params, DenseKronecker(stat_decay, inv_every, inverse), lr=lr, momentum=momentum,
                         damping=damping, factor_damping=factor_damping, weight_decay=weight_decay,
                         kl_clip=kl_clip, cov_every=cov_every,
                         model=model, batch_averaged=batch_averaged, grad_scaler=grad_scaler, fused=fused,
                         seed=seed, raise_on_nonfinite=raise_on_nonfinite, process_group=process_group,
                         fisher=fisher, likelihood=likelihood, mc_samples=mc_samples, skip_layers=skip_layers)

    # the dense strategy's settings, readable and settable on the optimizer as before
    stat_decay = property(lambda self: self.curvature.stat_decay,
                          lambda self, v: setattr(self.curvature, "stat_decay", float(v)))
    inv_every = property(lambda self: self.curvature.inv_every,
                         lambda self, v: setattr(self.curvature, "inv_every", int(v)))
    inverse = property(lambda self: self.curvature.inverse, lambda self, v: setattr(self.curvature, "inverse", v))


class _AsymptoticBlend:
    """ANG's direction rule (eq. 7's spherical blend of U and T), mixed into ANG and IFANG."""

    def _init_blend(self, lam_schedule, total_steps, lam_rate, lam_time_constant, per_layer) -> None:
        if lam_schedule is None:
            lam_schedule = "linear" if total_steps is not None else "saturating"
        self.lam_schedule = lam_schedule if isinstance(lam_schedule, str) else "callable"
        self.total_steps = total_steps
        self.lam_rate = float(lam_rate)
        self.lam_time_constant = lam_time_constant
        self.per_layer = bool(per_layer)
        self.last_coefficients = None

    @staticmethod
    def _blend_fn(lam_schedule, total_steps, lam_rate, lam_time_constant):
        V.positive("lam_rate", lam_rate)
        return lambda_schedule(lam_schedule, total_steps, lam_rate, lam_time_constant)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_lam_fn" not in self.__dict__ and self.lam_schedule != "callable":
            self._lam_fn = lambda_schedule(self.lam_schedule, self.total_steps, self.lam_rate,
                                           getattr(self, "lam_time_constant", DEFAULT_TIME_CONSTANT))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("last_coefficients", None)
        return state

    def current_lambda(self) -> float:
        """lam at the current step (the blend the next step() uses)."""
        fn = getattr(self, "_lam_fn", None)
        if fn is None:
            raise RuntimeError("a callable lam_schedule does not survive deepcopy/pickle; set opt._lam_fn")
        lam = float(fn(int(self.counters["steps"])))
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam_schedule returned {lam!r} at step {int(self.counters['steps'])}; must be in [0, 1]")
        return lam

    def _direction(self, nat, ts, red) -> None:
        self.last_coefficients = ops.ang_combine_(nat, ts, red, None, self.current_lambda(), self.per_layer,
                                                  fused=self.fused)

    def _step_curvature(self, idx, nat, red) -> torch.Tensor:
        # d = c1 U + c2 T is not U: its d^T F d is measured, not read off t^T F^-1 t
        states = [self.state[self._layers[i].weight] for i in idx]
        return self.curvature.quadratic_form(nat, states, [self._factor_damping(i) for i in idx])

    def _clip(self, idx, nat, scale) -> None:
        super()._clip(idx, nat, scale)
        self.last_coefficients = self.last_coefficients * scale.to(self.last_coefficients.dtype)


@shared_args_doc
class ANG(_AsymptoticBlend, KFAC):
    """Asymptotic natural gradient: K-FAC's natural gradient blended with the Euclidean gradient
    by eq. 7's slerp, lam following ``lam_schedule`` from 0 toward 1 over ``total_steps``.

    The defaults are Tang et al.'s Algorithm 2: the factors of the current minibatch (eqs. 9-10:
    stat_decay 0, cov_every 1) inverted at every step (inv_every 1) with lam added to each factor
    (eq. 8, ``factor_damping``), a plain step p <- p - lr d (line 9: momentum 0, no KL clip) at
    the paper's lr 0.005 (Sec. 3.1; its milestone decay is a torch LR scheduler on top).
    ``ANG.practical(model, **overrides)`` gives the K-FAC practice instead (:attr:`PRACTICAL`:
    EMA 0.95 refreshed every 10 steps, inverses every 100, damping gamma 1e-3 as factored
    Tikhonov, KL clip 1e-3 of the step taken, momentum 0.9, lr 0.01).

    Args: those of :class:`KFAC` with the defaults lr (0.005), momentum (0), stat_decay (0),
        kl_clip (None), cov_every (1), inv_every (1), factor_damping (None -> 0.03 when
        damping is not given either: the paper states no value; see README); fisher
        ('empirical' by default: the paper estimates the factors by "the empirical statistics over a mini-batch of training data",
        eqs. 9-10, DS the training loss's pre-activation derivatives; 'mc', 'type2') as
        :class:`KFAC`, and
        lam_schedule (None | 'linear' | 'exp' | 'cosine' | 'saturating' | callable(step) -> lam;
        None: 'linear' over total_steps when given, else 'saturating', which needs no horizon:
        lam = 1 - exp(-step / lam_time_constant), the concave shape of the paper's best
        strategy, Fig. 2; see :mod:`natasha_ext.optim.lambda_schedules` for the default 10000),
        total_steps (steps over which lam reaches 1; required for 'linear', 'exp', 'cosine'),
        lam_time_constant (10000 steps, the 'saturating' schedule's),
        lam_rate (5.0, the 'exp' schedule's rate), per_layer (False: one angle W for the whole
        parameter vector as eq. 7 is written; True: one per layer, Algorithm 2's per-layer loop).
        {shared_args}

    The schedule's position is the optimizer's step counter, saved in ``state_dict``.
    ``opt.last_coefficients`` holds the last [L, 2] (c1, c2) with d = c1 U + c2 T (device tensor).
    """

    DEFAULT_FACTOR_DAMPING = ANG_FACTOR_DAMPING
    PRACTICAL = KFAC.PRACTICAL

    def __init__(self, model_or_params, lr: float = PAPER_LR, momentum: float = 0.0, damping: Optional[float] = None,
                 stat_decay: float = 0.0, weight_decay: float = 0.0, kl_clip: Optional[float] = None,
                 cov_every: int = 1, inv_every: int = 1, inverse: str = "cholesky", *,
                 lam_schedule=None, total_steps: Optional[int] = None, lam_rate: float = 5.0,
                 lam_time_constant: int = DEFAULT_TIME_CONSTANT, per_layer: bool = False, fisher: str = "empirical",
                 **kwargs):
        self._lam_fn = self._blend_fn(lam_schedule, total_steps, lam_rate, lam_time_constant)
        super().__init__(model_or_params, lr=lr, momentum=momentum, damping=damping, stat_decay=stat_decay,
                         weight_decay=weight_decay, kl_clip=kl_clip, cov_every=cov_every, inv_every=inv_every,
                         inverse=inverse, fisher=fisher, **kwargs)
        self._init_blend(lam_schedule, total_steps, lam_rate, lam_time_constant, per_layer)


@shared_args_doc
class IFANG(_AsymptoticBlend, _KroneckerFamily):
    """Inverse-free ANG: ANG's direction with per-minibatch low-rank factors applied by Sherman-
    Morrison-Woodbury (Tang et al. 2021, eqs. 9-14, Algorithms 1-2). The M rows of a layer's A and
    DS are grouped into s' = ``rank`` group means (contiguous example blocks), YA = means/sqrt(s'),
    YG = sqrt(L/s') * means of per-example DS (L conv positions), and
        U = (lam I + YG^T YG)^-1 T (lam I + YA^T YA)^-1   (eq. 14, lam added to each factor)
    with (lam I + Y^T Y)^-1 = lam^-1 [I - Y^T (lam I + Y Y^T)^-1 Y] (eqs. 11-13): a scalar for
    s' = 1 (the paper's IFANG), a small s' x s' Cholesky otherwise. The statistics come from the
    current minibatch (eqs. 9-10), so ``cov_every`` defaults to 1 (a larger value reuses the last
    YA, YG); there is no EMA and no inverse refresh, so KFAC's ``stat_decay``, ``inv_every`` and
    ``inverse`` are not arguments. The defaults are Algorithm 2's plain step at the paper's lr
    (as :class:`ANG`); ``IFANG.practical(model, **overrides)`` adds the K-FAC practice
    (:attr:`PRACTICAL`: damping gamma 1e-2, i.e. lam = 0.1 per factor, KL clip 1e-3, momentum
    0.9, lr 0.01). Rank-s' factors see only s' directions; the other n - s' are damped by lam
    alone, so with the KL clip the step can reach a norm of sqrt(kl_clip) / lam independent of lr.

    Args: model_or_params, lr (0.005), momentum (0), damping (None), weight_decay, kl_clip (None),
        cov_every as :class:`KFAC`; factor_damping (None -> 0.3 when damping is not
        given either); rank (1): s'; lam_schedule, total_steps, lam_rate, lam_time_constant,
        per_layer as :class:`ANG`;
        model, batch_averaged, grad_scaler, fisher ('empirical', as :class:`ANG`: eqs. 9-10; 'mc',
        'type2'), likelihood, mc_samples, skip_layers as :class:`KFAC` (with 'mc' / 'type2' each
        backpropagated vector gives its own s' rows of YG; grouped convs, embeddings and norm layers
        use their current minibatch's factors, inverted directly).
        {shared_args}

    With a process group the s' groups are blocks of the global batch (rank r's shard is the
    r-th block of examples): each rank computes its share of every group mean and one all-reduce
    combines them, so N ranks equal one process for every s'.
    """

    DEFAULT_FACTOR_DAMPING = IFANG_FACTOR_DAMPING
    PRACTICAL = dict(lr=0.01, momentum=0.9, damping=1e-2, kl_clip=1e-3)

    def __init__(self, model_or_params, lr: float = PAPER_LR, momentum: float = 0.0, damping: Optional[float] = None,
                 weight_decay: float = 0.0, kl_clip: Optional[float] = None, cov_every: int = 1, *,
                 factor_damping: Optional[float] = None,
                 rank: int = 1, lam_schedule=None, total_steps: Optional[int] = None, lam_rate: float = 5.0,
                 lam_time_constant: int = DEFAULT_TIME_CONSTANT, per_layer: bool = False, model: Optional[nn.Module] = None, batch_averaged: bool = True,
                 grad_scaler=None, fused: Optional[bool] = None, seed: Optional[int] = None,
                 raise_on_nonfinite: bool = False, process_group=None, fisher: str = "empirical",
                 likelihood: str = "categorical", mc_samples: int = 1, skip_layers=None):
        V.positive_int("rank", rank)
        self._lam_fn = self._blend_fn(lam_schedule, total_steps, lam_rate, lam_time_constant)
        damping, factor_damping = self._resolve_damping(damping, factor_damping)
        self._check_common(lr, momentum, damping, factor_damping, weight_decay, kl_clip, cov_every)
        super().__init__(model_or_params, LowRankKronecker(rank), lr=lr, momentum=momentum, damping=damping,
                         factor_damping=factor_damping, weight_decay=weight_decay, kl_clip=kl_clip,
                         cov_every=cov_every, model=model,
                         batch_averaged=batch_averaged, grad_scaler=grad_scaler, fused=fused, seed=seed,
                         raise_on_nonfinite=raise_on_nonfinite, process_group=process_group, fisher=fisher,
                         likelihood=likelihood, mc_samples=mc_samples, skip_layers=skip_layers)
        self._init_blend(lam_schedule, total_steps, lam_rate, lam_time_constant, per_layer)

    @property
    def rank(self) -> int:
        """s', the number of row groups (the rank of the factors)."""
        return self.curvature.rank
