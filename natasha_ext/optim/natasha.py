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
  * mu: with ``snapshot_batches=None`` the first call of an epoch uses its own minibatch
    (mu = grad f_i(x_tilde)); with ``snapshot_batches=N`` the first N calls of every epoch only
    accumulate mu = (1/N) sum grad f_{S_j}(x_tilde) over their minibatches (the parameters do not
    move) -- that is how a user supplies a larger snapshot batch |S| = N * batch size with an
    ordinary training loop. At t = 0 of the first sub-epoch x_0 = x_tilde, so d = mu exactly and
    no second gradient is needed; the last snapshot call takes that step. A one-minibatch mu
    steers the whole epoch towards that minibatch's gradient (the correction terms only cancel
    the noise *relative to* x_tilde): with an unshuffled loader whose period divides the epoch
    length every epoch starts on the same batch -- prefer snapshot_batches of several minibatches.
  * Natasha2's Oja phase happens in the first call of each outer iteration, on that call's
    minibatch (all Oja iterations use the same minibatch Hessian); when it does not kick, the
    gradient at y_k it already computed starts the Natasha1.5 epoch in the same call.

Counters (``opt.counters``): steps, gradients, hvps, skipped_steps, epochs, subepochs, kicks,
oja_runs, oja_iterations, last_rayleigh (v^T H v of the last Oja run, NaN before the first).
Host syncs per call: one for the non-finite check of the gradients -- grad f_i(x_t) and, for the
faithful estimator, grad f_i(x_tilde) checked together (skip the call, touch no state) -- and for
Natasha2's Oja phase one more for the kick decision.
"""
from __future__ import annotations

import math
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


class _NatashaEpochs(NatashaOptimizer):
    """The Natasha1.5 epoch state machine shared by :class:`Natasha15` and :class:`Natasha2`."""

    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps", "epochs", "subepochs", "kicks", "oja_runs",
                "oja_iterations", "last_rayleigh")
    ACCUMULATION_STATE = ("anchor", "avg_sum", "mu", "center")

    def __init__(self, params, defaults, *, fused, seed, raise_on_nonfinite, process_group=None):
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)
        self.counters["last_rayleigh"] = float("nan")
        # position in the epoch: in_epoch (0/1), snap (snapshot batches seen), t, s, k (outer iteration)
        self.position = {"in_epoch": 0, "snap": 0, "t": 0, "s": 0, "k": 0}

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
        return bool(pos["in_epoch"]) and self._vr() and pos["snap"] >= (self._hp("snapshot_batches") or 1)

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

    def _epoch_call(self, params, grads, snap=None) -> None:
        """Advance the epoch by one call whose gradient at the current point is ``grads`` (and,
        past the snapshot calls of the faithful estimator, ``snap`` = grad f_i(x_tilde), already
        checked finite)."""
        pos, m = self.position, self._m()
        if not pos["in_epoch"]:
            self._start_epoch(params)
        if self._vr():
            mu = self._state_list(params, "mu")
            n_snap = self._hp("snapshot_batches") or 1
            if pos["snap"] < n_snap:
                torch._foreach_add_(mu, [g.to(m_.dtype) for g, m_ in zip(grads, mu)], alpha=1.0 / n_snap)
                pos["snap"] += 1
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

    Args:
        params: parameters or param groups.
        lr (float): alpha, the inner step size (Liu et al.: 0.01). Per group.
        sigma (float): regulariser weight (Liu et al.: 0.5). Per group. The faithful estimator adds
            2 sigma (x_t - x_hat) (gradient of sigma ||x - x_hat||^2); the simplified one sigma (x_t - x_hat)
            as in Liu et al.'s Alg. 2.
        epoch_size (int): B, inner iterations per epoch (Liu et al.: 27).
        subepochs (int): p, sub-epochs per epoch (Liu et al.: 9); m = B/p >= 2 must be an integer.
        variance_reduction (bool): True: the faithful estimator grad f_i(x_t) - grad f_i(x_tilde) + mu
            + 2 sigma (x_t - x_hat) (two gradients per call); False: Liu et al.'s Alg. 2.
        snapshot_batches (int, optional): minibatches averaged into mu at each epoch start (see the
            module docstring); None: the epoch's first minibatch.
        {shared_args}
        Natasha1.5's maths draws no random numbers (``seed`` is kept for uniformity). With a
        process group each rank evaluates the closure on its shard and the two gradients of a
        faithful call (at x_t and at x_tilde) are averaged in one bucket, so mu needs no
        collective of its own.

    ``step(closure)``: ``closure()`` returns the minibatch loss without calling backward.
    """

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

    Args:
        params: parameters or param groups.
        lr, sigma, epoch_size, subepochs: as in :class:`Natasha15` (lr, sigma per group).
        delta (float): curvature threshold: kick when v^T H v <= -delta/2 (paper's delta).
        eta (float): Oja step, power method on I - eta H; needs eta * |lambda_max(H)| <= 1.
        oja_iters (int, optional): Oja iterations per outer iteration; default ceil(1/delta^2)
            (Liu et al. Alg. 3 line 6) capped at ``MAX_DEFAULT_OJA_ITERS`` = 1000.
        L (float): smoothness L in F^k(x) = f(x) + L max(0, ||x - y_k|| - delta/L2)^2 (faithful only).
        L2 (float): second-order smoothness; the kick length is delta/L2 and the F^k radius delta/L2
            (faithful). The simplified variant kicks by delta (Liu et al. Alg. 3 line 11, where L = L2 = 1).
        hvp ('exact' | 'finite_difference' | 'auto'): double backward, or (grad f(x + q v) - grad f(x)) / q
            with q = ``fd_eps`` (Liu et al. Alg. 4, q = 1e-4); 'auto' (default): exact, or finite
            differences for a closure that calls backward itself.
        variant ('faithful' | 'simplified'): faithful = Liu et al. Alg. 1 (variance-reduced estimator
            with 2 sigma, F^k applied by its closed-form prox, kick delta/L2); simplified = Liu et al.
            Alg. 3-4 (estimator grad f_i(x_t) + sigma (x_t - x_hat), no F^k, kick delta).
        snapshot_batches (int, optional): as in :class:`Natasha15` (faithful variant).
        {shared_args}
        The Oja start vector and the kick sign come from the Philox stream; with a process group
        every rank draws the same ones and the HVPs are averaged, so the kick decision agrees
        across ranks.
    """

    def __init__(self, params, lr: float = 0.01, sigma: float = 0.5, epoch_size: int = 27, subepochs: int = 9,
                 delta: float = 0.1, eta: float = 0.1, oja_iters: Optional[int] = None, L: float = 1.0,
                 L2: float = 1.0, hvp: str = "auto", fd_eps: float = 1e-4, variant: str = "faithful",
                 snapshot_batches: Optional[int] = None, *, fused: Optional[bool] = None, seed: Optional[int] = None,
                 raise_on_nonfinite: bool = False, process_group=None):
        defaults = dict(lr=lr, sigma=sigma, epoch_size=epoch_size, subepochs=subepochs, delta=delta, eta=eta,
                        oja_iters=oja_iters, L=L, L2=L2, hvp=hvp, fd_eps=fd_eps, variant=variant,
                        snapshot_batches=snapshot_batches, variance_reduction=(variant == "faithful"))
        self._check_group(defaults)
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)

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

    def _uses_center(self) -> bool:
        return self._hp("variant") == "faithful"

    def _prox_L(self) -> float:
        return float(self._hp("L"))

    def _prox_radius(self) -> float:
        return float(self._hp("delta")) / float(self._hp("L2"))

    def oja_iterations(self) -> int:
        it = self._hp("oja_iters")
        return it if it is not None else min(math.ceil(1.0 / float(self._hp("delta")) ** 2), MAX_DEFAULT_OJA_ITERS)

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if closure is None:
            evaluate_closure(None, "Natasha2.step")
        params = self._params()
        self.check_grads(params)
        if not params:
            return evaluate_closure(closure).detach()
        self._init_state(params)
        if self.position["in_epoch"]:
            return self._inner_call(closure, params)
        return self._outer_call(closure, params)

    def _outer_call(self, closure, params):
        """Oja's algorithm at y_k, then a kick or the start of a Natasha1.5 epoch."""
        h = HVP(closure, params, method=self._hp("hvp"), fd_eps=float(self._hp("fd_eps")))
        self.counters["gradients"] += h.n_grad
        loss, grads = h.loss, h.grads
        try:
            if not self.all_finite(grads):
                self.skip_nonfinite("gradients")
                return loss
            offset0 = self.rng.offset
            # parameters the loss does not reach stay out of v, so a kick never moves them
            res = oja_min_eigenvector(h, params, eta=float(self._hp("eta")), iters=self.oja_iterations(),
                                      rng=self.rng, fused=self.fused, exclude=h.unused)
        finally:
            h.release()
        self.counters["hvps"] += res.hvps
        if h.method == "finite_difference":
            self.counters["gradients"] += res.hvps  # each finite-difference HVP is one more gradient
        rq = float(res.rayleigh)  # the kick decision: the one sync of the Oja phase
        if not math.isfinite(rq):
            self.rng.offset = offset0  # leave the state as it was
            self.skip_nonfinite("Hessian-vector products")
            return loss
        self.counters["oja_runs"] += 1
        self.counters["oja_iterations"] += res.iterations
        self.counters["last_rayleigh"] = rq
        delta = float(self._hp("delta"))
        if rq <= -delta / 2:
            length = delta / float(self._hp("L2")) if self._hp("variant") == "faithful" else delta
            sign = self.rng.sign()
            with torch.no_grad():
                for p, v in zip(params, res.vector):
                    p.add_(v.to(p.dtype), alpha=sign * length)
            self.counters["kicks"] += 1
            self.position["k"] += 1
        else:
            self._epoch_call(params, grads)  # first call of an epoch: no snapshot gradient yet
        self.counters["steps"] += 1
        return loss
