"""Natasha1.5 and Natasha2 (Allen-Zhu, "Natasha 2: Faster non-convex optimization than SGD",
NeurIPS 2018), with the algorithms as written out by Liu, Liu, Liu & Li, "Implementing and
evaluating Natasha2 with PyTorch" (Columbia University project report, undated), Algorithms 1-4;
"Liu et al." below.

Natasha1.5 epoch k (Liu et al. Alg. 1 lines 22-35), B = ``epoch_size``, p = ``subepochs``, m = B/p:

    x_hat <- y_k;  x_tilde <- x_hat;  mu <- grad f_S(x_tilde)
    for s = 0 .. p-1:
        x_0 <- x_hat
        for t = 0 .. m-1:
            d  = grad f_i(x_t) - grad f_i(x_tilde) + mu + 2 sigma (x_t - x_hat)      (faithful)
            d  = grad f_i(x_t) + sigma (x_t - x_hat)                                 (Liu et al. Alg. 2)
            x_{t+1} = argmin_y { psi(y) + ||y - x_t||^2 / (2 lr) + <d, y> }  = prox_{lr psi}(x_t - lr d)
        x_hat <- (x_0 + ... + x_{m-1}) / m
    y_{k+1} <- x_hat

psi = 0 for Natasha1.5 on its own; inside faithful Natasha2 psi(x) = L max(0, ||x - y_k|| - delta/L2)^2
(the F^k regulariser), whose prox is a closed-form shrink towards y_k (see ops.svrg_step).

Natasha2 outer iteration k (Liu et al. Alg. 1 lines 12-38; Alg. 3/4 for ``variant='simplified'``):
Oja's algorithm on I - eta H(y_k) gives a unit v; if v^T H v <= -delta/2 the iterate is kicked,
y_{k+1} = y_k +- (delta/L2) v with a random sign, otherwise one Natasha1.5 epoch runs on F^k.

How the loops map onto ``step(closure)`` calls (one call per minibatch, nothing else needed):
  * Each call that needs a gradient is one inner iteration t on the closure's minibatch; the
    gradient at the snapshot x_tilde (faithful estimator) is taken on the *same* minibatch by
    evaluating the closure a second time with the parameters swapped to x_tilde.
  * The average x_hat uses x_0 .. x_{m-1}; the paper's last update x_m is never used, so the
    step that produces x_{m-1} also finishes the sub-epoch (the kernel's ``finalize``). A
    sub-epoch therefore takes m-1 calls and an epoch p (m-1) calls (+ snapshot calls); no
    minibatch is spent on a gradient whose step is thrown away. m >= 2 is required (m = 1 never
    moves: x_hat = x_0).
  * mu (Liu et al. Alg. 1 line 24: mu = (1/B) sum_{i in S} grad f_i(x_tilde), |S| = B): the first
    N = ``snapshot_batches`` calls of every epoch only accumulate mu = (1/N) sum_j grad f_{S_j}(x_tilde)
    over their minibatches (the parameters do not move). The default N = B = ``epoch_size`` takes
    as many component functions (closure minibatches) for mu as the epoch has inner iterations, as
    the algorithm does; ``snapshot_batches=1`` is the cheap one-minibatch mu, which steers the whole
    epoch towards that minibatch's gradient (the correction terms only cancel the noise *relative
    to* x_tilde). At t = 0 of the first sub-epoch x_0 = x_tilde, so d = mu exactly and no second
    gradient is needed; the last snapshot call takes that step. An epoch therefore takes
    N + p (m-1) - 1 calls.
  * Natasha2's outer iteration k (at y_k, nothing moves until the decision): the first call runs
    Oja's algorithm on its minibatch's Hessian (all Oja iterations use that one minibatch);
    the kick test of Alg. 1 line 19 is on the full Hessian, v^T grad^2 f(y_k) v, which the next
    ``kick_test_batches`` calls estimate on *fresh* minibatches (one HVP each, averaged): an
    unbiased estimate, whereas v^T H_i v on Oja's own minibatch i is biased low (v minimises it),
    so kicks would come too often (``kick_test_batches=0`` tests there, as Liu et al.'s Alg. 4
    line 8 does). The gradients at y_k of the Oja call and of these calls are gradients at
    x_tilde = y_k of the epoch that follows when there is no kick: they count towards mu, and
    the last one starts the epoch in its own call; a kick drops them.

Oja's step size: the power method on I - eta H finds lambda_min(H) when eta |lambda(H)| <= 1.
An Oja iterate u with u^T H u > 1/eta proves the condition broken (lambda_max >= u^T H u); then
``eta_check='warn'`` (default: the algorithm as written, fixed eta) warns once per optimizer, and
``eta_check='adapt'`` sets eta <- 1/max u^T H u in every param group and reruns Oja on the same
minibatch (up to ``MAX_ETA_ADAPTATIONS`` times per call; counter ``eta_adaptations``).

Counters (``opt.counters``): steps, gradients, hvps, skipped_steps, epochs, subepochs, kicks,
oja_runs (outer iterations decided: Oja run + kick test), oja_iterations (all Oja steps, reruns
included), kick_tests (fresh-minibatch v^T H v evaluations), eta_adaptations, last_rayleigh (the
v^T H v the last kick decision used, NaN before the first).
Host syncs per call: one for the non-finite check of the gradients -- grad f_i(x_t) and, for the
faithful estimator, grad f_i(x_tilde) checked together (skip the call, touch no state) -- and for
Natasha2's Oja and kick-test calls one more for the Rayleigh quotients.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional

import torch

from natasha_ext import distributed, ops
from natasha_ext.curvature import HVP, HVP_METHODS, evaluate_closure, gradients, oja_min_eigenvector
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NatashaOptimizer, shared_args_doc
from natasha_ext.precision import accumulation_dtype

#: cap on Natasha2's default Oja iteration count ceil(1/delta^2) (Liu et al. advise delta >= 0.05,
#: i.e. at most 400 iterations)
MAX_DEFAULT_OJA_ITERS = 1000
#: Oja reruns per call with ``eta_check='adapt'`` (each with eta <- 1/max u^T H u of the run before)
MAX_ETA_ADAPTATIONS = 3
ETA_CHECKS = ("warn", "adapt")


class _NatashaEpochs(NatashaOptimizer):
    """The Natasha1.5 epoch state machine shared by :class:`Natasha15` and :class:`Natasha2`."""

    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps", "epochs", "subepochs", "kicks", "oja_runs",
                "oja_iterations", "kick_tests", "eta_adaptations", "last_rayleigh")
    #: the hyperparameters of Liu et al.'s experiment (appendix: alpha 0.01, B 27, p 9, sigma 0.5),
    #: which they ran with their Alg. 2 (plain gradient + sigma (x - x_hat)); see ``report_experiment``
    REPORT_EXPERIMENT = dict(lr=0.01, sigma=0.5, epoch_size=27, subepochs=9)
    ACCUMULATION_STATE = ("anchor", "avg_sum", "mu", "center")

    def __init__(self, params, defaults, *, fused, seed, raise_on_nonfinite, process_group=None):
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)
        self.counters["last_rayleigh"] = float("nan")
        # position in the epoch: in_epoch (0/1), snap (snapshot batches seen), t, s, k (outer iteration)
        self.position = {"in_epoch": 0, "snap": 0, "t": 0, "s": 0, "k": 0}

    @classmethod
    def report_experiment(cls, params, **overrides):
        """The optimizer as Liu et al. ran it in their experiments (``REPORT_EXPERIMENT``), with
        ``overrides`` on top; the class defaults are the algorithm of their Alg. 1 instead."""
        return cls(params, **{**cls.REPORT_EXPERIMENT, **overrides})

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def _check_group(cls, group: dict) -> None:
        V.nonnegative("lr", group["lr"])
        V.nonnegative("sigma", group["sigma"])
        epoch_size, subepochs = group["epoch_size"], group["subepochs"]
        V.positive_int("epoch_size", epoch_size)
        V.positive_int("subepochs", subepochs)
        if epoch_size % subepochs:
            raise ValueError(f"invalid epoch_size/subepochs: {epoch_size}/{subepochs} (epoch_size must be a "
                             "multiple of subepochs: m = epoch_size / subepochs inner steps per sub-epoch)")
        if epoch_size // subepochs < 2:
            raise ValueError(f"invalid epoch_size/subepochs: m = {epoch_size // subepochs} (need m >= 2: the "
                             "sub-epoch average of x_0 .. x_{m-1} never moves with m = 1)")
        if group["snapshot_batches"] is not None:
            V.positive_int("snapshot_batches", group["snapshot_batches"])
        if not isinstance(group["variance_reduction"], bool):
            raise TypeError(f"variance_reduction must be a bool, got {type(group['variance_reduction']).__name__}")

    def _hp(self, name):
        """A structural hyperparameter, which must agree across param groups."""
        vals = {repr(g[name]) for g in self.param_groups}
        if len(vals) > 1:
            raise ValueError(f"{name} differs between param groups ({sorted(vals)}); {type(self).__name__} "
                             f"needs one {name} for the whole model (only lr and sigma may differ per group)")
        return self.param_groups[0][name]

    def _m(self) -> int:
        return self._hp("epoch_size") // self._hp("subepochs")

    def _n_snapshot(self) -> int:
        """Calls whose minibatch gradient at x_tilde is averaged into mu (default |S| = B)."""
        return self._hp("snapshot_batches") or self._hp("epoch_size")

    # ------------------------------------------------------------------ state
    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _group_params(self, g) -> List[torch.Tensor]:
        return [p for p in g["params"] if p.requires_grad]

    def _vr(self) -> bool:
        return bool(self._hp("variance_reduction"))

    def _uses_center(self) -> bool:
        return False

    def _init_state(self, params):
        vr, center = self._vr(), self._uses_center()
        for p in params:
            st = self.state[p]
            if "anchor" in st:
                continue
            acc = accumulation_dtype(p)
            st["anchor"] = p.detach().to(acc, copy=True)
            st["avg_sum"] = torch.zeros_like(p, dtype=acc, memory_format=torch.contiguous_format)
            if vr:
                st["snapshot"] = p.detach().clone(memory_format=torch.contiguous_format)
                st["mu"] = torch.zeros_like(p, dtype=acc, memory_format=torch.contiguous_format)
            if center:
                st["center"] = p.detach().to(acc, copy=True)

    def _state_list(self, params, key):
        return [self.state[p][key] for p in params]

    def extra_state(self) -> dict:
        out = super().extra_state()
        out["position"] = dict(self.position)
        return out

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.position.update({k: int(v) for k, v in state["position"].items()})

    # ------------------------------------------------------------------ gradients
    def _loss_and_grads(self, closure, params):
        loss = evaluate_closure(closure)
        grads = gradients(loss, params)
        self.counters["gradients"] += 1
        return loss.detach(), grads

    def _snapshot_grads(self, closure, params):
        """grad f_i(x_tilde) on the closure's minibatch: swap the parameters to x_tilde and back."""
        snap = self._state_list(params, "snapshot")
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_(params, snap)
        try:
            _, g = self._loss_and_grads(closure, params)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
        return g

    # ------------------------------------------------------------------ the epoch machine
    def _start_epoch(self, params):
        with torch.no_grad():
            for p in params:
                st = self.state[p]
                st["anchor"].copy_(p)
                st["avg_sum"].zero_()
                if "snapshot" in st:
                    st["snapshot"].copy_(p)
                    st["mu"].zero_()
                if "center" in st:
                    st["center"].copy_(p)
        self.position.update(in_epoch=1, snap=0, t=0, s=0)

    def _svrg(self, params, grads, snapshot_grads, mu, finalize):
        """One ops.svrg_step per param group (one call over all groups when the F^k prox is on)."""
        reg_scale = 2.0 if self._vr() else 1.0
        if self._uses_center():
            lrs = {float(g["lr"]) for g in self.param_groups}
            sigmas = {float(g["sigma"]) for g in self.param_groups}
            if len(lrs) > 1 or len(sigmas) > 1:
                raise ValueError("Natasha2(variant='faithful') needs one lr and one sigma for all param groups: "
                                 "the F^k proximal step is a closed form only for a single step size")
            g0 = self.param_groups[0]
            groups = [(params, grads, snapshot_grads, mu, float(g0["lr"]), float(g0["sigma"]))]
        else:
            groups, i = [], 0
            for g in self.param_groups:
                n = len(self._group_params(g))
                sl = slice(i, i + n)
                groups.append((params[sl], grads[sl], None if snapshot_grads is None else snapshot_grads[sl],
                               None if mu is None else mu[sl], float(g["lr"]), float(g["sigma"])))
                i += n
        for ps, gs, sgs, mus, lr, sigma in groups:
            if not ps:
                continue
            ops.svrg_step(ps, gs, self._state_list(ps, "anchor"), self._state_list(ps, "avg_sum"), lr=lr,
                          reg=reg_scale * sigma, snapshot_grads=sgs, mu=mus, finalize=finalize,
                          center=self._state_list(ps, "center") if self._uses_center() else None,
                          prox_L=self._prox_L(), prox_radius=self._prox_radius(), fused=self.fused)

    def _prox_L(self) -> float:
        return 0.0

    def _prox_radius(self) -> float:
        return 0.0

    def _needs_snapshot_grads(self) -> bool:
        """True when the next epoch call takes grad f_i(x_tilde) (past the snapshot calls)."""
        pos = self.position
        return bool(pos["in_epoch"]) and self._vr() and pos["snap"] >= self._n_snapshot()

    def _inner_call(self, closure, params):
        """One call inside an epoch: grad f_i(x_t) [and grad f_i(x_tilde) on the same minibatch],
        one finiteness check over both (one host sync), then the SVRG step. A non-finite value in
        either skips the call before any state is touched."""
        if self._needs_snapshot_grads():
            # both gradients local first, then averaged over the process group in ONE bucket; the
            # snapshot's loss value is not needed, so the raw closure skips its loss all-reduce
            with distributed.using_group(None):
                loss, grads = self._loss_and_grads(closure, params)
                raw = closure.__wrapped__ if self.process_group is not None else closure  # see wrap_closure
                snap = self._snapshot_grads(raw, params)
            both = distributed.all_reduce_mean(grads + snap)
            grads, snap = both[:len(grads)], both[len(grads):]
        else:
            loss, grads = self._loss_and_grads(closure, params)
            snap = None
        if not self.all_finite(grads if snap is None else grads + snap):
            self.skip_nonfinite("gradients" if snap is None else "gradients (at x_t or at the snapshot x_tilde)")
            return loss
        self._epoch_call(params, grads, snap)
        self.counters["steps"] += 1
        return loss

    def _accumulate_mu(self, params, grads) -> None:
        """mu += grads / N: one of the N snapshot gradients grad f_{S_j}(x_tilde)."""
        mu = self._state_list(params, "mu")
        torch._foreach_add_(mu, [g.to(m_.dtype) for g, m_ in zip(grads, mu)], alpha=1.0 / self._n_snapshot())
        self.position["snap"] += 1

    def _epoch_call(self, params, grads, snap=None) -> None:
        """Advance the epoch by one call whose gradient at the current point is ``grads`` (and,
        past the snapshot calls of the faithful estimator, ``snap`` = grad f_i(x_tilde), already
        checked finite)."""
        pos, m = self.position, self._m()
        if not pos["in_epoch"]:
            self._start_epoch(params)
        if self._vr():
            mu = self._state_list(params, "mu")
            n_snap = self._n_snapshot()
            if pos["snap"] < n_snap:
                self._accumulate_mu(params, grads)
                if pos["snap"] < n_snap:
                    return
                # x_0 = x_tilde: grad f_i(x_0) - grad f_i(x_tilde) cancels, d = mu (+ 0 regulariser)
                self._svrg(params, grads, grads, mu, m if pos["t"] == m - 2 else 0)
            else:
                if snap is None:
                    raise RuntimeError("internal: the faithful estimator needs grad f_i(x_tilde) here")
                self._svrg(params, grads, snap, mu, m if pos["t"] == m - 2 else 0)
        else:
            self._svrg(params, grads, None, None, m if pos["t"] == m - 2 else 0)
        pos["t"] += 1
        if pos["t"] == m - 1:  # x_{m-1} was produced and averaged: the sub-epoch is over
            pos["t"] = 0
            pos["s"] += 1
            self.counters["subepochs"] += 1
            if pos["s"] == self._hp("subepochs"):  # y_{k+1} <- x_hat (already in the parameters)
                pos["in_epoch"] = 0
                pos["k"] += 1
                self.counters["epochs"] += 1


@shared_args_doc
class Natasha15(_NatashaEpochs):
    r"""Natasha1.5: SVRG epochs with sub-epoch averaging and the sigma ||x - x_hat||^2 regulariser.

    The defaults are Liu et al.'s Alg. 1 (lines 22-35): the variance-reduced estimator with mu
    from |S| = B minibatches. Allen-Zhu sets B, p, alpha, sigma only up to constants (Alg. 1
    lines 2-9, Theta(.)); the numbers are the only ones Liu et al. state (appendix), which they
    ran with their Alg. 2 -- that run is :meth:`report_experiment`.

    Args:
        params: parameters or param groups.
        lr (float): alpha, the inner step size (Liu et al. appendix: 0.01). Per group.
        sigma (float): regulariser weight (Liu et al. appendix: 0.5). Per group. The faithful
            estimator adds 2 sigma (x_t - x_hat) (gradient of sigma ||x - x_hat||^2, Alg. 1 line 29);
            the simplified one sigma (x_t - x_hat) as in Liu et al.'s Alg. 2 line 7.
        epoch_size (int): B, inner iterations per epoch (Liu et al. appendix: 27).
        subepochs (int): p, sub-epochs per epoch (Liu et al. appendix: 9); m = B/p >= 2 must be an integer.
        variance_reduction (bool): True (Alg. 1 line 29): grad f_i(x_t) - grad f_i(x_tilde) + mu
            + 2 sigma (x_t - x_hat) (two gradients per call); False: Liu et al.'s Alg. 2.
        snapshot_batches (int, optional): N, the minibatches averaged into mu at each epoch start
            (see the module docstring); None: N = B = ``epoch_size`` (Alg. 1 line 24, |S| = B).
        {shared_args}
        Natasha1.5's maths draws no random numbers (``seed`` is kept for uniformity). With a
        process group each rank evaluates the closure on its shard and the two gradients of a
        faithful call (at x_t and at x_tilde) are averaged in one bucket, so mu needs no
        collective of its own.

    ``step(closure)``: ``closure()`` returns the minibatch loss without calling backward.
    ``Natasha15.report_experiment(params, **overrides)``: Liu et al.'s experiment (Alg. 2 with
    alpha 0.01, B 27, p 9, sigma 0.5).
    """

    REPORT_EXPERIMENT = dict(_NatashaEpochs.REPORT_EXPERIMENT, variance_reduction=False)

    def __init__(self, params, lr: float = 0.01, sigma: float = 0.5, epoch_size: int = 27, subepochs: int = 9,
                 variance_reduction: bool = True, snapshot_batches: Optional[int] = None, *,
                 fused: Optional[bool] = None, seed: Optional[int] = None, raise_on_nonfinite: bool = False,
                 process_group=None):
        defaults = dict(lr=lr, sigma=sigma, epoch_size=epoch_size, subepochs=subepochs,
                        variance_reduction=variance_reduction, snapshot_batches=snapshot_batches)
        self._check_group(defaults)
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            evaluate_closure(None, "Natasha15.step")
        params = self._params()
        self.check_grads(params)
        if not params:
            return evaluate_closure(closure).detach()
        self._init_state(params)
        return self._inner_call(closure, params)


@shared_args_doc
class Natasha2(_NatashaEpochs):
    r"""Natasha2: Oja's algorithm finds negative curvature (kick along it), else a Natasha1.5 epoch.

    The defaults are Liu et al.'s Alg. 1 (``variant='faithful'``, mu from |S| = B minibatches, the
    kick test on fresh minibatches); neither paper gives numbers for delta and eta (Allen-Zhu's
    delta is the target second-order accuracy, Liu et al. advise delta >= 0.05), so those two
    defaults are this package's. :meth:`report_experiment` is Liu et al.'s Alg. 4 run.

    Args:
        params: parameters or param groups.
        lr, sigma, epoch_size, subepochs, snapshot_batches: as in :class:`Natasha15` (lr, sigma
            per group; ``snapshot_batches`` applies to the faithful variant).
        delta (float): curvature threshold: kick when v^T H v <= -delta/2 (Alg. 1 line 19).
        eta (float): Oja step, power method on I - eta H (Alg. 1 line 16); needs eta |lambda(H)| <= 1
            (see ``eta_check``).
        oja_iters (int, optional): Oja iterations per outer iteration; default ceil(1/delta^2)
            (Liu et al. Alg. 3 line 6; Alg. 1 line 15 has O(1/delta^2)) capped at
            ``MAX_DEFAULT_OJA_ITERS`` = 1000.
        L (float): smoothness L in F^k(x) = f(x) + L max(0, ||x - y_k|| - delta/L2)^2 (faithful only).
        L2 (float): second-order smoothness; the kick length is delta/L2 and the F^k radius delta/L2
            (faithful). The simplified variant kicks by delta (Liu et al. Alg. 3 line 11, where L = L2 = 1).
        hvp ('exact' | 'finite_difference' | 'auto'): double backward, or (grad f(x + q v) - grad f(x)) / q
            with q = ``fd_eps`` (Liu et al. Alg. 4, q = 1e-4); 'auto' (default): exact, or finite
            differences for a closure that calls backward itself.
        variant ('faithful' | 'simplified'): faithful = Liu et al. Alg. 1 (variance-reduced estimator
            with 2 sigma, F^k applied by its closed-form prox, kick delta/L2); simplified = Liu et al.
            Alg. 3-4 (estimator grad f_i(x_t) + sigma (x_t - x_hat), no F^k, kick delta).
        kick_test_batches (int): fresh minibatches (the calls after the Oja call) on which
            v^T H v is averaged for the kick decision (Alg. 1 line 19 tests the full Hessian);
            0: Oja's own minibatch (Liu et al. Alg. 4 line 8; biased low, kicks too often).
        eta_check ('warn' | 'adapt'): what to do when an Oja iterate proves eta lambda_max > 1:
            warn once (eta stays as given), or set eta <- 1/(largest u^T H u seen) and rerun Oja.
        {shared_args}
        The Oja start vector and the kick sign come from the Philox stream; with a process group
        every rank draws the same ones and the HVPs are averaged, so the kick decision agrees
        across ranks.

    ``Natasha2.report_experiment(params, **overrides)``: Liu et al.'s Alg. 4 (simplified
    variant, finite-difference HVPs with q = 1e-4, kick test on Oja's minibatch) with the
    appendix's alpha 0.01, B 27, p 9, sigma 0.5; delta and eta stay the class's (not stated).
    """

    REPORT_EXPERIMENT = dict(_NatashaEpochs.REPORT_EXPERIMENT, variant="simplified", hvp="finite_difference",
                             kick_test_batches=0)
    ACCUMULATION_STATE = _NatashaEpochs.ACCUMULATION_STATE + ("oja_vector",)

    def __init__(self, params, lr: float = 0.01, sigma: float = 0.5, epoch_size: int = 27, subepochs: int = 9,
                 delta: float = 0.1, eta: float = 0.1, oja_iters: Optional[int] = None, L: float = 1.0,
                 L2: float = 1.0, hvp: str = "auto", fd_eps: float = 1e-4, variant: str = "faithful",
                 snapshot_batches: Optional[int] = None, kick_test_batches: int = 1, eta_check: str = "warn", *,
                 fused: Optional[bool] = None, seed: Optional[int] = None, raise_on_nonfinite: bool = False,
                 process_group=None):
        defaults = dict(lr=lr, sigma=sigma, epoch_size=epoch_size, subepochs=subepochs, delta=delta, eta=eta,
                        oja_iters=oja_iters, L=L, L2=L2, hvp=hvp, fd_eps=fd_eps, variant=variant,
                        snapshot_batches=snapshot_batches, variance_reduction=(variant == "faithful"),
                        kick_test_batches=kick_test_batches, eta_check=eta_check)
        self._check_group(defaults)
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)
        self.position["outer"] = 0  # calls of the current outer iteration's Oja phase done (0: none)
        self.kick_rayleigh_sum = 0.0  # sum of the fresh-minibatch v^T H v of this outer iteration
        self._eta_warned = False

    @classmethod
    def _check_group(cls, group: dict) -> None:
        super()._check_group(group)
        V.positive("delta", group["delta"])
        V.positive("eta", group["eta"])
        if group["oja_iters"] is not None:
            V.positive_int("oja_iters", group["oja_iters"])
        V.nonnegative("L", group["L"])
        V.positive("L2", group["L2"])
        V.choice("hvp", group["hvp"], HVP_METHODS)
        V.positive("fd_eps", group["fd_eps"])
        V.choice("variant", group["variant"], ("faithful", "simplified"))
        V.positive_int("kick_test_batches", group["kick_test_batches"], allow_zero=True)
        V.choice("eta_check", group["eta_check"], ETA_CHECKS)

    def _uses_center(self) -> bool:
        return self._hp("variant") == "faithful"

    def _prox_L(self) -> float:
        return float(self._hp("L"))

    def _prox_radius(self) -> float:
        return float(self._hp("delta")) / float(self._hp("L2"))

    def oja_iterations(self) -> int:
        it = self._hp("oja_iters")
        return it if it is not None else min(math.ceil(1.0 / float(self._hp("delta")) ** 2), MAX_DEFAULT_OJA_ITERS)

    def extra_state(self) -> dict:
        out = super().extra_state()
        out["kick_rayleigh_sum"] = self.kick_rayleigh_sum
        return out

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.kick_rayleigh_sum = float(state.get("kick_rayleigh_sum", 0.0))

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            evaluate_closure(None, "Natasha2.step")
        params = self._params()
        self.check_grads(params)
        if not params:
            return evaluate_closure(closure).detach()
        self._init_state(params)
        if self.position["outer"]:
            return self._kick_test_call(closure, params)
        if self.position["in_epoch"]:
            return self._inner_call(closure, params)
        return self._oja_call(closure, params)

    # ------------------------------------------------------------------ the outer iteration
    def _curvature(self, closure, params):
        """(HVP engine on the closure's minibatch with its gradient at y_k, finite?); a non-finite
        gradient skips the call (released engine, nothing touched)."""
        h = HVP(closure, params, method=self._hp("hvp"), fd_eps=float(self._hp("fd_eps")))
        self.counters["gradients"] += h.n_grad
        if self.all_finite(h.grads):
            return h, True
        h.release()
        self.skip_nonfinite("gradients")
        return h, False

    def _count_hvps(self, h, n: int) -> None:
        self.counters["hvps"] += n
        if h.method == "finite_difference":
            self.counters["gradients"] += n  # each finite-difference HVP is one more gradient

    def _run_oja(self, h, params):
        """Oja's algorithm at y_k on ``h``'s minibatch, with the eta check; returns (result,
        v^T H v) or None when a product was not finite (stream and eta as before the call)."""
        offset0, etas0 = self.rng.offset, [g["eta"] for g in self.param_groups]
        for attempt in range(MAX_ETA_ADAPTATIONS + 1):
            eta = float(self._hp("eta"))
            # parameters the loss does not reach stay out of v, so a kick never moves them
            res = oja_min_eigenvector(h, params, eta=eta, iters=self.oja_iterations(), rng=self.rng,
                                      fused=self.fused, exclude=h.unused)
            self._count_hvps(h, res.hvps)
            rq, top = torch.stack([res.rayleigh, res.max_rayleigh]).tolist()  # the one sync of the run
            if not (math.isfinite(rq) and math.isfinite(top)):  # leave the state as it was
                self.rng.offset = offset0
                for g, e in zip(self.param_groups, etas0):
                    g["eta"] = e
                return None
            self.counters["oja_iterations"] += res.iterations
            if top * eta <= 1.0:
                break
            if self._hp("eta_check") == "adapt" and attempt < MAX_ETA_ADAPTATIONS:
                for g in self.param_groups:
                    g["eta"] = 1.0 / top
                self.counters["eta_adaptations"] += 1
                continue
            if not self._eta_warned:
                self._eta_warned = True
                warnings.warn(f"Natasha2: an Oja iterate has u^T H u = {top:.4g} > 1/eta = {1.0 / eta:.4g}, so "
                              f"eta * lambda_max(H) > 1 and Oja's algorithm on I - eta H may find the top instead "
                              f"of the bottom of the spectrum; lower eta or pass eta_check='adapt'",
                              RuntimeWarning, stacklevel=5)  # the user's step() call
            break
        return res, rq

    def _oja_call(self, closure, params):
        """First call of outer iteration k: Oja's algorithm on this minibatch's Hessian at y_k; with
        ``kick_test_batches=0`` also the kick decision, else the epoch from y_k starts on trial."""
        h, ok = self._curvature(closure, params)
        if not ok:
            return h.loss
        try:
            out = self._run_oja(h, params)
        finally:
            h.release()
        if out is None:
            self.skip_nonfinite("Hessian-vector products")
            return h.loss
        res, rq = out
        n_tests = int(self._hp("kick_test_batches"))
        if n_tests == 0:
            self._decide(params, h.grads, res.vector, rq)
        else:
            for p, v in zip(params, res.vector):
                self.state[p]["oja_vector"] = v.to(accumulation_dtype(p))  # the state policy (per parameter)
            self._start_epoch(params)  # on trial: x_tilde = y_k; a kick abandons it
            self._pending_snapshot(params, h.grads)
            self.position["outer"] = 1
            self.kick_rayleigh_sum = 0.0
        self.counters["steps"] += 1
        return h.loss

    def _kick_test_call(self, closure, params):
        """v^T H v on this call's (fresh) minibatch; the last such call decides."""
        h, ok = self._curvature(closure, params)
        if not ok:
            return h.loss
        # a parameter added since the Oja call (add_param_group) was not part of v: component 0
        v = [self.state[p].get("oja_vector") for p in params]
        v = [torch.zeros_like(p, dtype=accumulation_dtype(p)) if t is None else t for t, p in zip(v, params)]
        try:
            hv = h([t.to(p.dtype) for t, p in zip(v, params)])
        finally:
            h.release()
        self._count_hvps(h, 1)
        rq = float(sum(torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)) for a, b in zip(v, hv)))
        if not math.isfinite(rq):
            self.skip_nonfinite("Hessian-vector products")
            return h.loss
        self.counters["kick_tests"] += 1
        self.kick_rayleigh_sum += rq
        n_tests = int(self._hp("kick_test_batches"))
        if self.position["outer"] < n_tests:
            self.position["outer"] += 1
            self._pending_snapshot(params, h.grads)
        else:
            self.position["outer"] = 0
            self._decide(params, h.grads, v, self.kick_rayleigh_sum / n_tests)
        self.counters["steps"] += 1
        return h.loss

    def _pending_snapshot(self, params, grads) -> None:
        """A gradient at y_k = x_tilde before the kick decision: it counts towards mu unless it
        would complete mu (the call that completes mu also takes the first step)."""
        if self._vr() and self.position["snap"] + 1 < self._n_snapshot():
            self._accumulate_mu(params, grads)

    def _decide(self, params, grads, vector, rq: float) -> None:
        """Alg. 1 lines 19-21: kick along +-vector when rq <= -delta/2, else the Natasha1.5 epoch
        on F^k continues (or starts) with this call's gradient at y_k."""
        self.counters["oja_runs"] += 1
        self.counters["last_rayleigh"] = rq
        delta = float(self._hp("delta"))
        if rq <= -delta / 2:
            length = delta / float(self._hp("L2")) if self._hp("variant") == "faithful" else delta
            sign = self.rng.sign()
            with torch.no_grad():
                for p, v in zip(params, vector):
                    p.add_(v.to(p.dtype), alpha=sign * length)
            self.counters["kicks"] += 1
            self.position["k"] += 1
            self.position["in_epoch"] = 0  # the epoch started on trial (if any) is dropped
        else:
            self._epoch_call(params, grads)
