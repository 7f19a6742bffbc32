"""Stochastic ellipsoidal trust region (Algorithm 1 of "Adaptive norms for deep learning with
regularized Newton methods", anonymous authors, under double-blind review, 2019; its equation
numbers are used below) and adaptive cubic regularisation (Cartis, Gould & Toint, "Adaptive cubic
regularisation methods for unconstrained optimization. Part I", 2011) in the same adaptive norms.

Both minimise a second-order model of the minibatch loss around the current weights w,

    TR  (eq. 7):  min_s g^T s + 1/2 s^T B s            s.t. ||s||_A <= radius
    ARC:          min_s g^T s + 1/2 s^T B s + sigma/3 ||s||_A^3

with ||s||_A = sqrt(s^T A s) and A = diag(a) the ellipsoid, the same A for both (the paper's
footnote 5: the matrix-induced norms carry over to cubic regularisation unchanged):

* ``norm='rmsprop'`` (eq. 3, diagonal): a = v + eps, v <- beta v + (1 - beta) g^2 (no bias
  correction, as in eq. 3);
* ``norm='adagrad'`` (eq. 2, diagonal): a = v + eps, v <- v + g^2;
* ``norm='spherical'``: a = 1 (A = I, the usual spherical region).

Fused vs reference (fp32): the compiled ``tr_cg_init_`` computes the RMSProp update as one fused
multiply-add, v = fma(beta, v, ((1 - beta) g) g), with beta and 1 - beta formed in fp32; the
pure-PyTorch reference rounds beta v and ((1 - beta) g) g separately and takes 1 - beta from
double. Both are eq. 3; they differ by up to one ulp per element and step (measured: ~40% of the
elements, relative 2e-7), and the trust region's discrete decisions (CG stopping tests, accept/
reject) can amplify that over a few steps (1e-4-level weight differences seen in fp32, 1e-13 in
fp64). Runs are bit-identical for a fixed ``fused`` setting; compare fused and reference runs with
fp64 or with tolerances.

The ellipsoid is updated with the current gradient before the subproblem (Alg. 1, line 5), so
ellipsoidal and spherical runs differ only by A. B is the minibatch Hessian through
Hessian-vector products (``curvature='hessian'``, engines ``hvp='exact'`` double backward or
``'finite_difference'``) or the generalised Gauss-Newton matrix (``curvature='gauss_newton'``,
PSD). rho = (L(w) - L(w + s)) / (m(0) - m(s)) uses one extra loss evaluation on the same batch
(the closure is called again under ``torch.no_grad``).

Closure: ``closure()`` evaluates the current minibatch and returns the loss without calling
backward; with ``curvature='gauss_newton'`` it returns ``(loss, outputs)`` (the network output
the loss is computed from; see :mod:`natasha_ext.curvature.gauss_newton`), or only the loss
when the optimizer is given ``model=``: the output of that module's forward pass during the
closure is then taken as ``outputs`` (a forward hook held only while the closure runs; this is
how the training CLI, whose closures return the loss, uses Gauss-Newton). Tuples are also
accepted with ``curvature='hessian'`` (the outputs are then ignored).

Rejected steps restore the parameters by copying a saved copy back (bit-identical, no
subtraction). The trust-region hyperparameters are global (one subproblem over all parameters):
groups may differ only in ``norm``, ``beta`` and ``eps``.

Progress is measured as in the paper, in backpropagations: a gradient counts 1, a Hessian-vector
product 1 (Pearlmutter's cost model; finite differences: one more gradient), a Gauss-Newton
product 2. After each step ``optimizer.last_step`` holds rho, radius (or sigma), CG/Lanczos
iterations, accepted, the curvature products and backprops of that step and the stop reason;
``optimizer.counters`` accumulates them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from natasha_ext import ops
from natasha_ext.curvature.gauss_newton import GaussNewton
from natasha_ext.curvature.hvp import HVP, HVP_METHODS, evaluate_loss
from natasha_ext.curvature.lanczos import Lanczos, cubic_tridiag, flatten, leftmost, unflatten
from natasha_ext.curvature.steihaug import cubic_cg, steihaug_cg
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NatashaOptimizer, shared_args_doc

NORMS = ("rmsprop", "adagrad", "spherical")
NORM_SCALES = ("raw", "initial_mean")  # ARC's cubic term: in A (as TrustRegion) or A / mean(a at the first step)
CURVATURES = ("hessian", "gauss_newton")


class _NonFiniteCurvature(Exception):
    """A curvature product returned NaN/inf while solving the subproblem (the step is skipped)."""


def _with_outputs(closure, model: torch.nn.Module):
    """A closure returning (loss, output of ``model``'s last forward pass during it)."""
    def paired():
        seen = []
        handle = model.register_forward_hook(lambda mod, inp, out: seen.append(out))
        try:
            out = closure()
        finally:
            handle.remove()
        if isinstance(out, (tuple, list)) or not seen:
            return out  # already (loss, outputs), or nothing to pair (split_closure_output explains)
        return out, seen[-1]
    return paired


def _loss_only(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class _RegularisedNewton(NatashaOptimizer):
    COUNTERS = ("steps", "gradients", "hvps", "skipped_steps", "backprops", "loss_evals", "accepted",
                "rejected", "subproblem_iters", "resolution_limit_hits")
    _GLOBAL: tuple = ()
    _PER_GROUP = ("norm", "beta", "eps")
    ACCUMULATION_STATE = ("square_avg",)
    _PICKLED_PRIVATE = NatashaOptimizer._PICKLED_PRIVATE + ("_model",)  # model= survives deepcopy
    def __init__(self, params, defaults, fused, seed, raise_on_nonfinite, model=None, process_group=None):
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (its output pairs with a loss-only closure), "
                            f"got {type(model).__name__}")
        self._model = model
        self.last_step: Dict[str, object] = {}

    # ------------------------------------------------------------------ plumbing
    @classmethod
    def _check_group(cls, group: dict) -> None:
        V.choice("norm", group["norm"], NORMS)
        V.in_range("beta", group["beta"], 0.0, 1.0, low_open=True, high_open=True)
        V.positive("eps", group["eps"])
        V.choice("curvature", group["curvature"], CURVATURES)
        V.choice("hvp", group["hvp"], HVP_METHODS)
        V.positive("fd_eps", group["fd_eps"])
        V.nonnegative("grad_tol", group["grad_tol"])
        V.positive_int("eigen_iters", group["eigen_iters"], allow_zero=True)

    def _check_groups(self, groups=None) -> None:
        groups = self.param_groups if groups is None else groups
        super()._check_groups(groups)
        for g in groups[1:]:
            for k in self._GLOBAL:
                if g[k] != groups[0][k]:
                    raise ValueError(f"{k} is a global hyperparameter of {type(self).__name__} (one subproblem over "
                                     f"all parameters); param groups may differ only in {self._PER_GROUP}")

    def _params(self) -> List[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _oracle(self, closure, params):
        g0 = self.param_groups[0]
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure: closure() must evaluate the model on the "
                               "current minibatch and return the loss (or (loss, outputs) with "
                               "curvature='gauss_newton') without calling backward")
        if g0["curvature"] == "gauss_newton":
            model = getattr(self, "_model", None)
            return GaussNewton(closure if model is None else _with_outputs(closure, model), params), 2
        return HVP(lambda: _loss_only(closure()), params, method=g0["hvp"], fd_eps=g0["fd_eps"]), 1

    def _buffers(self, params):
        """Per-parameter ellipsoid state (persisted) and CG scratch (not persisted)."""
        work = getattr(self, "_work", None)
        if work is None or work["ids"] != [id(p) for p in params]:
            mk = lambda: [self.accumulation_zeros(p) for p in params]
            work = {"ids": [id(p) for p in params], "a": mk(), "s": mk(), "r": mk(), "p": mk()}
            self._work = work
        return work

    def _init_subproblem(self, params, grads):
        """Ellipsoid update fused with the CG start; returns (work, [g^T A^-1 g, g^T g]) tensor."""
        work = self._buffers(params)
        idx = {id(p): i for i, p in enumerate(params)}
        total = None
        for group in self.param_groups:
            ii = [idx[id(p)] for p in group["params"] if id(p) in idx]
            if not ii:
                continue
            mode = group["norm"]
            v = []
            for i in ii:
                st = self.state[params[i]]
                if mode != "spherical":
                    if "square_avg" not in st:
                        st["square_avg"] = torch.zeros_like(work["a"][i])
                    v.append(st["square_avg"])
                else:
                    v.append(work["a"][i])  # unused by the spherical mode
            sel = lambda key: [work[key][i] for i in ii]
            out = ops.tr_cg_init_(v, sel("a"), sel("s"), sel("r"), sel("p"), [grads[i] for i in ii],
                                  group["beta"], group["eps"], mode, fused=self.fused)
            total = out if total is None else total + out.to(total.dtype)
        return work, total

    def _ellipsoid_backup(self, params):
        return [(st["square_avg"], st["square_avg"].clone()) for p in params
                for st in [self.state.get(p, {})] if "square_avg" in st]

    @staticmethod
    def _restore_ellipsoid(backup):
        for t, b in backup:
            t.copy_(b)

    def _trial(self, closure, params, step: List[torch.Tensor]):
        """Move to w + s, evaluate the loss (no graph), return (loss, saved weights)."""
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, step):
                p.add_(s.to(p.dtype))
            loss = _loss_only(evaluate_loss(closure))  # grad enabled for a closure that calls backward
        self.counters["loss_evals"] += 1
        return float(loss), saved

    def _begin(self, closure, info: dict):
        """The start both methods share: gradient (and graph) at x, the step's info record, and the
        non-finite check. Returns (params, group 0, oracle, backprops per product, info); a
        non-empty info["reason"] means the step was skipped (counted, graphs freed)."""
        params = self._params()
        self.check_grads(params)
        oracle, bp_per = self._oracle(closure, params)
        info = {**info, "rho": float("nan"), "accepted": False, "iters": 0, "reason": ""}
        if not self.all_finite(oracle.grads + [oracle.loss.reshape(1)]):
            info["reason"] = "nonfinite_gradient"
            try:
                self.skip_nonfinite("gradients")
            finally:  # counted and the graphs freed also when raising
                self._finish(oracle, bp_per, info, taken=False)
        return params, self.param_groups[0], oracle, bp_per, info

    def _ratio(self, closure, params, step_vec, loss0, model, iters, reason, oracle, bp_per, info, backup):
        """rho = actual / predicted decrease of the step, from one loss evaluation at w + s.
        Returns (rho, trial loss, saved weights), or None when the step is already finished:
        the model predicts no decrease ('stationary', nothing moves), or the loss at w + s is not
        finite (a non-finite event: weights and ellipsoid restored, the step skipped, or
        NonFiniteError with ``raise_on_nonfinite``)."""
        pred = -model
        info.update(iters=iters, reason=reason, predicted=pred)
        if not pred > 0:
            info["reason"] = "stationary"
            self._finish(oracle, bp_per, info)
            return None
        trial, saved = self._trial(closure, params, step_vec)
        if not math.isfinite(trial):
            self._restore(params, saved)
            self._restore_ellipsoid(backup)
            info["reason"] = "nonfinite_trial_loss"
            try:
                self.skip_nonfinite("the loss at the trial point")
            finally:
                self._finish(oracle, bp_per, info, taken=False)
            return None
        rho = (float(loss0) - trial) / pred
        return (rho if math.isfinite(rho) else -math.inf), trial, saved

    def _resolution(self, params, a) -> tuple:
        """(eps * ||x||_A, ||x||_A) with eps the machine epsilon of the coarsest parameter dtype:
        a step whose A-norm is below eps * ||x||_A cannot change x at the dtype's resolution."""
        eps = max(torch.finfo(p.dtype).eps for p in params)
        xa = math.sqrt(sum(float((ai * p.detach().to(ai.dtype).square()).sum()) for ai, p in zip(a, params)))
        return eps * xa, xa

    @staticmethod
    def _restore(params, saved):
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)  # restore by copy: bit-identical

    def _finish(self, oracle, backprops_per_product, info, taken: bool = True):
        """Count the step's products (and the step itself unless it was skipped), free graphs."""
        if taken:
            self.counters["steps"] += 1
        self.counters["gradients"] += oracle.n_grad
        self.counters["hvps"] += oracle.n_hvp
        bp = oracle.n_grad + backprops_per_product * oracle.n_hvp
        self.counters["backprops"] += bp
        self.counters["subproblem_iters"] += info.get("iters", 0)
        info.update(hvps=oracle.n_hvp, backprops=bp)
        self.last_step = info
        oracle.release()

    def _skip_curvature(self, oracle, bp_per, info, backup, iters):
        """NaN/inf in a curvature product: ellipsoid restored, step skipped (or NonFiniteError)."""
        self._restore_ellipsoid(backup)
        info.update(reason="nonfinite_curvature", iters=iters)
        try:
            self.skip_nonfinite("curvature")
        finally:  # counted and the graphs freed also when raising
            self._finish(oracle, bp_per, info, taken=False)

    def _eigenpoint(self, matvec, params, a, grads, radius: float, iters: int):
        """Assumption 2's eigenpoint: ||s||_A = radius along the leftmost eigenvector of
        A^{-1/2} B A^{-1/2} (Lanczos from a Philox Rademacher start). None without negative curvature."""
        if iters <= 0:
            return None
        asq = flatten(a).rsqrt()
        start = [torch.empty_like(t) for t in a]
        self.rng.rademacher_(start, fused=self.fused)
        lz = Lanczos(lambda x: asq * flatten(matvec(unflatten(asq * x, a)), asq.dtype), flatten(start, asq.dtype))
        for _ in range(iters):
            lz.step()
            if lz.nonfinite:
                raise _NonFiniteCurvature
            if lz.broke_down:
                break
        theta, u = leftmost(lz.T())
        if theta >= 0:
            return None
        s = asq * lz.combine(u.to(asq.dtype)) * radius
        gs = float(torch.dot(flatten(grads, s.dtype), s))
        if gs > 0:
            s, gs = -s, -gs
        return unflatten(s, a), gs + 0.5 * theta * radius * radius, len(lz.alphas)

    def extra_state(self) -> dict:
        st = super().extra_state()
        st["last_step"] = {k: v for k, v in self.last_step.items() if isinstance(v, (int, float, str, bool))}
        return st

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.last_step = dict(state.get("last_step", {}))


@shared_args_doc
class TrustRegion(_RegularisedNewton):
    r"""Stochastic ellipsoidal (or spherical) trust region, Algorithm 1 of the paper.

    The defaults are Alg. 1: the radius update of line 8 has two tiers, Delta <- gamma Delta when
    rho >= eta (the step is accepted) and Delta <- Delta / gamma otherwise (rejected), with no
    upper bound. :meth:`practical` returns the three-tier form with a cap instead
    (``eta_very_successful=0.95, max_radius=10``: grow only on very successful steps, keep the
    radius on merely successful ones), the usual refinement of Conn, Gould & Toint, "Trust-region
    methods", 2000 (Alg. 6.1.1); the paper states no numbers for eta, gamma or Delta_0 (Alg. 1,
    line 1 asks only gamma > 1, 0 < eta < 1, Delta_0 > 0), so those keep the values below.

    Args:
        params: parameters or param groups.
        radius: initial radius Delta_0 (default 1e-4, in the A-norm).
        max_radius: upper bound of the radius (default inf: Alg. 1 has none). Growth also stops
            short of overflowing to inf.
        eta: acceptance threshold of Alg. 1; a step with rho >= eta is accepted (default 0.01).
        eta_very_successful: None (default) is Alg. 1 line 8: every accepted step multiplies the
            radius by gamma. A number in [eta, 1] gives the three-tier update: rho < eta: reject,
            radius /= gamma; eta <= rho < eta_very_successful: accept, radius kept;
            rho >= eta_very_successful: accept, radius = min(gamma radius, max_radius).
        gamma: radius factor > 1 of Alg. 1 (default 2.0, the common choice of Conn et al. 2000).
        norm: 'rmsprop' (eq. 3), 'adagrad' (eq. 2) or 'spherical' (A = I). Per group.
        beta: RMSProp decay of eq. 3 (default 0.8). Per group.
        eps: epsilon of eqs. 2-3 (default 1e-8); keeps A uniformly equivalent (Lemma 2). Per group.
        cg_max_iters: Steihaug-CG iterations (= curvature products) per step (default 50).
        cg_tol: relative residual ||r||_{A^-1} <= cg_tol ||g||_{A^-1} stops CG (default 0.1).
        curvature: 'hessian' or 'gauss_newton' (closure returns (loss, outputs)).
        hvp: Hessian-vector-product engine, 'exact' or 'finite_difference'; fd_eps its step.
            'auto' (default): exact, or finite differences for a closure that calls backward.
        grad_tol: epsilon_g of Alg. 1 line 4: if ||g|| <= grad_tol the gradient is set to 0 and
            the step is the eigenpoint (default 0: only an exactly vanishing gradient).
        eigen_iters: Lanczos iterations for the eigenpoint when the gradient vanishes (default
            10; 0 disables it, then a stationary point ends the progress).
        model: optional module whose output pairs with a loss-only closure when
            ``curvature='gauss_newton'`` (see the module docstring).
        {shared_args}
        With a process group every rank takes the same accept/reject decision.

    Gap to Theorem 1 (second-order rate): Assumption 2 asks every step for at least the model
    decrease of the Cauchy point *and* of the eigenpoint s^E (eq. 28, along the leftmost
    eigenvector of A^{-1/2} B A^{-1/2} when it is negative). Steihaug CG guarantees the Cauchy
    decrease only; the eigenpoint is computed (``eigen_iters`` Lanczos steps) only when
    ||g|| <= grad_tol, i.e. at the points where Alg. 1 line 4 zeroes the gradient. While
    ||g|| > grad_tol a step may decrease the model less than s^E would, so the first-order part
    of Theorem 1 holds (Cauchy decrease, uniformly equivalent norms, Lemma 2) but its
    O(eps_H^-3) second-order part is not guaranteed by this implementation; CG does follow
    negative curvature to the boundary when it meets it.

    Resolution floor: a rejection divides the radius by gamma but never below eps * ||x||_A
    (eps: machine epsilon of the coarsest parameter dtype, ||x||_A the weights in the ellipsoid's
    norm), the size below which a step cannot change the weights; each time the floor stops the
    shrinking ``counters['resolution_limit_hits']`` grows by one (a run that keeps hitting it has
    reached its dtype's resolution: stop, or switch to fp64). The radius grows again by gamma on
    accepted steps (very successful ones with ``eta_very_successful``); ``opt.radius = r`` resets it by hand (also saved in ``state_dict``).
    A non-finite loss at the trial point w + s is a non-finite event, not a rejection: weights
    and ellipsoid restored, ``counters['skipped_steps']`` + 1 (or NonFiniteError).
    Skipped steps are not counted in ``counters['steps']``.

    ``step(closure)`` returns the loss at the current point (before the step).
    """

    _GLOBAL = ("radius", "max_radius", "eta", "eta_very_successful", "gamma", "cg_max_iters", "cg_tol",
               "curvature", "hvp", "fd_eps", "grad_tol", "eigen_iters")

    PRACTICAL = dict(eta_very_successful=0.95, max_radius=10.0)

    def __init__(self, params, radius: float = 1e-4, max_radius: float = math.inf, eta: float = 0.01,
                 eta_very_successful: Optional[float] = None, gamma: float = 2.0, norm: str = "rmsprop",
                 beta: float = 0.8, eps: float = 1e-8, cg_max_iters: int = 50, cg_tol: float = 0.1,
                 curvature: str = "hessian", hvp: str = "auto", fd_eps: float = 1e-4, grad_tol: float = 0.0,
                 eigen_iters: int = 10, *, fused: Optional[bool] = None, seed: Optional[int] = None,
                 raise_on_nonfinite: bool = False, model: Optional[torch.nn.Module] = None, process_group=None):
        defaults = dict(radius=radius, max_radius=max_radius, eta=eta, eta_very_successful=eta_very_successful,
                        gamma=gamma, norm=norm, beta=beta, eps=eps, cg_max_iters=cg_max_iters, cg_tol=cg_tol,
                        curvature=curvature, hvp=hvp, fd_eps=fd_eps, grad_tol=grad_tol, eigen_iters=eigen_iters)
        self._check_group(defaults)
        super().__init__(params, defaults, fused, seed, raise_on_nonfinite, model, process_group)
        self.radius = float(radius)

    @classmethod
    def _check_group(cls, group: dict) -> None:
        super()._check_group(group)
        V.positive("radius", group["radius"])
        if not group["max_radius"] == math.inf:  # inf: no cap (Alg. 1)
            V.positive("max_radius", group["max_radius"])
        if group["max_radius"] < group["radius"]:
            raise ValueError(f"invalid max_radius: {group['max_radius']!r} (must be >= radius={group['radius']!r})")
        V.in_range("eta", group["eta"], 0.0, 1.0, low_open=True)
        if group["eta_very_successful"] is not None:
            V.in_range("eta_very_successful", group["eta_very_successful"], group["eta"], 1.0)
        V.greater_than("gamma", group["gamma"], 1.0)
        V.positive_int("cg_max_iters", group["cg_max_iters"])
        V.positive("cg_tol", group["cg_tol"])

    def step(self, closure: Callable = None):
        params, g0, oracle, bp_per, info = self._begin(closure, {"radius": self.radius})
        loss0, grads = oracle.loss, oracle.grads
        if info["reason"]:
            return loss0
        backup = self._ellipsoid_backup(params)
        work, tot = self._init_subproblem(params, grads)
        rz0, gg = tot.tolist()
        matvec = lambda vs: oracle([v.to(p.dtype) for v, p in zip(vs, params)])
        s = work["s"]
        if math.sqrt(gg) <= g0["grad_tol"] or rz0 <= 0.0:
            try:
                eig = self._eigenpoint(matvec, params, work["a"], grads, self.radius, g0["eigen_iters"])
            except _NonFiniteCurvature:
                self._skip_curvature(oracle, bp_per, info, backup, oracle.n_hvp)
                return loss0
            if eig is None:
                info["reason"] = "stationary"
                self._finish(oracle, bp_per, info)
                return loss0
            step_vec, model, iters = eig
            reason = "eigenpoint"
        else:
            res = steihaug_cg(matvec, grads, s, work["r"], work["p"], work["a"], rz0, self.radius,
                              g0["cg_max_iters"], g0["cg_tol"], fused=self.fused)
            step_vec, model, iters, reason = s, res.model, res.iters, res.reason
            if reason == "nonfinite":
                self._skip_curvature(oracle, bp_per, info, backup, iters)
                return loss0
        evaluated = self._ratio(closure, params, step_vec, loss0, model, iters, reason, oracle, bp_per, info,
                                backup)
        if evaluated is None:
            return loss0
        rho, trial, saved = evaluated
        accepted = rho >= g0["eta"]
        if not accepted:
            self._restore(params, saved)
            self.radius = self._shrunk_radius(params, work["a"], g0)
            self.counters["rejected"] += 1
        else:
            self.counters["accepted"] += 1
            self.radius = self._grown_radius(rho, g0)
        info.update(rho=rho, accepted=accepted, trial_loss=trial, radius=self.radius)
        self._finish(oracle, bp_per, info)
        return loss0

    def _grown_radius(self, rho: float, g0) -> float:
        """The radius after an accepted step: gamma * radius (Alg. 1 line 8), or with
        ``eta_very_successful`` set only when rho reaches it; at most max_radius, never inf."""
        threshold = g0["eta"] if g0["eta_very_successful"] is None else g0["eta_very_successful"]
        if rho < threshold:
            return self.radius
        grown = min(self.radius * g0["gamma"], g0["max_radius"])
        return grown if math.isfinite(grown) else self.radius

    def _shrunk_radius(self, params, a, g0) -> float:
        """radius / gamma, floored at the dtype's resolution eps * ||x||_A (see the class
        docstring); a floor hit is counted in ``counters['resolution_limit_hits']``."""
        new = self.radius / g0["gamma"]
        floor, _ = self._resolution(params, a)
        if new < floor:
            self.counters["resolution_limit_hits"] += 1
            return max(min(self.radius, floor), torch.finfo(torch.float64).tiny)
        return new

    def extra_state(self) -> dict:
        st = super().extra_state()
        st["radius"] = self.radius
        return st

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.radius = float(state["radius"])


@shared_args_doc
class ARC(_RegularisedNewton):
    r"""Adaptive cubic regularisation (Cartis, Gould & Toint, "Adaptive cubic regularisation methods
    for unconstrained optimization. Part I", 2011, Algorithm 2.1) in the adaptive norm:
    m(s) = g^T s + 1/2 s^T B s + sigma/3 ||s||_A^3, rho = (L(w) - L(w+s)) / (L(w) - m(s)).
    Alg. 2.1 asks sigma_0 > 0, 0 < eta1 <= eta2 < 1 and gamma_2 >= gamma_1 > 1 (sigma shrinks or
    stays on very successful steps, stays or grows up to gamma_1 on successful ones, grows by
    gamma_1..gamma_2 on rejections); the defaults below are one choice inside those ranges.

    Args:
        sigma: initial regularisation (default 1.0).
        eta1: acceptance threshold (default 0.1); eta2: very successful threshold (default 0.9).
        gamma: factor > 1 (default 2.0). Update (Cartis et al. 2011, gamma_1 = gamma_2 = gamma):
            rho >= eta2: sigma = max(sigma / gamma, sigma_min); eta1 <= rho < eta2: kept;
            rho < eta1: rejected (weights restored bit-exactly), sigma = gamma sigma.
        sigma_min: lower bound of sigma (default 1e-8).
        norm: 'rmsprop' | 'adagrad' | 'spherical' (as :class:`TrustRegion`); beta, eps likewise.
        norm_scale: 'raw' (default) measures the cubic term in the A of eqs. 2-3 itself, the norm
            :class:`TrustRegion`'s radius uses (the paper's footnote 5 carries its norms over to
            cubic regularisation unchanged; Lemma 2's uniform equivalence is stated for this A).
            sigma then plays the role of the Hessian's Lipschitz constant in that norm, so with
            RMSProp's small a (squared gradients, ~1e-6..1e-12) sigma_0 = 1 starts far too small
            and the first steps are rejected until sigma has grown by gamma enough times.
            'initial_mean' (what :meth:`practical` uses) measures it in A / mean(a_0), a_0 the
            ellipsoid of the first completed step, a constant from then on (saved in
            ``state_dict``): sigma_0 = 1 is on a usable scale from the start and sigma keeps
            referring to one norm, the trust region's up to a fixed factor. (Normalising by the
            current mean(a) every step, as earlier versions did, would rescale the norm by
            (mean a_t / mean a_{t+1})^{3/2} between steps without rho ever testing it, so the
            sigma adapted by the accept/reject rule would chase a moving scale.) Spherical: A = I
            in every mode.
        subproblem: 'lanczos' (Krylov subspace of A^{-1/2} B A^{-1/2} from A^{-1/2} g, the cubic
            model minimised on the tridiagonal by the secular equation; stops when the model
            gradient beta_k |y_k| <= subproblem_tol ||g||_{A^-1}) or 'cg' (truncated PCG with
            exact line minimisation of the cubic model, the fused CG sweep).
        subproblem_max_iters: Krylov dimension / CG iterations per step (default 25).
        subproblem_tol: relative tolerance (default 0.1).
        curvature, hvp, fd_eps, grad_tol, eigen_iters, model: as :class:`TrustRegion` (with a vanishing
            gradient Lanczos starts from a Philox Rademacher vector, which finds the escape
            direction -theta_min/sigma along the leftmost eigenvector).
        {shared_args}

    Resolution ceiling (the counterpart of :class:`TrustRegion`'s radius floor): a rejection
    multiplies sigma by gamma but not past sigma_max = ||g||_{A^-1} / (eps ||x||_A)^2, where the
    cubic step sqrt(||g||_{A^-1} / sigma) would fall below the weights' resolution; each hit adds
    one to ``counters['resolution_limit_hits']``; sigma falls again on very successful steps and
    ``opt.sigma = s`` resets it by hand. A non-finite trial loss is a skipped step, as in
    :class:`TrustRegion`; skipped steps are not counted in ``counters['steps']``.
    """

    _GLOBAL = ("sigma", "eta1", "eta2", "gamma", "sigma_min", "subproblem", "subproblem_max_iters",
               "subproblem_tol", "curvature", "hvp", "fd_eps", "grad_tol", "eigen_iters", "norm_scale")

    PRACTICAL = dict(norm_scale="initial_mean")
    _PICKLED_PRIVATE = _RegularisedNewton._PICKLED_PRIVATE + ("_norm_unit",)

    def __init__(self, params, sigma: float = 1.0, eta1: float = 0.1, eta2: float = 0.9, gamma: float = 2.0,
                 norm: str = "rmsprop", subproblem: str = "lanczos", beta: float = 0.8, eps: float = 1e-8,
                 sigma_min: float = 1e-8, subproblem_max_iters: int = 25, subproblem_tol: float = 0.1,
                 curvature: str = "hessian", hvp: str = "auto", fd_eps: float = 1e-4, grad_tol: float = 0.0,
                 eigen_iters: int = 10, norm_scale: str = "raw", *, fused: Optional[bool] = None,
                 seed: Optional[int] = None, raise_on_nonfinite: bool = False, model: Optional[torch.nn.Module] = None,
                 process_group=None):
        defaults = dict(sigma=sigma, eta1=eta1, eta2=eta2, gamma=gamma, sigma_min=sigma_min, norm=norm,
                        subproblem=subproblem, beta=beta, eps=eps, subproblem_max_iters=subproblem_max_iters,
                        subproblem_tol=subproblem_tol, curvature=curvature, hvp=hvp, fd_eps=fd_eps,
                        grad_tol=grad_tol, eigen_iters=eigen_iters, norm_scale=norm_scale)
        self._check_group(defaults)
        super().__init__(params, defaults, fused, seed, raise_on_nonfinite, model, process_group)
        self.sigma = float(sigma)
        self._norm_unit: Optional[float] = None  # mean(a_0) of norm_scale='initial_mean', once known

    @classmethod
    def _check_group(cls, group: dict) -> None:
        super()._check_group(group)
        V.positive("sigma", group["sigma"])
        V.in_range("eta1", group["eta1"], 0.0, 1.0, low_open=True)
        V.in_range("eta2", group["eta2"], group["eta1"], 1.0)
        V.greater_than("gamma", group["gamma"], 1.0)
        V.nonnegative("sigma_min", group["sigma_min"])
        V.choice("subproblem", group["subproblem"], ("lanczos", "cg"))
        V.choice("norm_scale", group["norm_scale"], NORM_SCALES)
        V.positive_int("subproblem_max_iters", group["subproblem_max_iters"])
        V.positive("subproblem_tol", group["subproblem_tol"])

    def _lanczos_step(self, matvec, params, a, grads, gnorm_zero: bool, g0):
        asq = flatten(a).rsqrt()
        b = asq * flatten(grads, asq.dtype)
        gn = 0.0 if gnorm_zero else float(b.norm())
        if gn == 0.0:
            start = [torch.empty_like(t) for t in a]
            self.rng.rademacher_(start, fused=self.fused)
            b0 = flatten(start, asq.dtype)
            kmax = max(g0["eigen_iters"], 1)
        else:
            b0, kmax = b, g0["subproblem_max_iters"]
        lz = Lanczos(lambda x: asq * flatten(matvec(unflatten(asq * x, a)), asq.dtype), b0)
        y = val = None
        for _ in range(kmax):
            lz.step()
            if lz.nonfinite:
                raise _NonFiniteCurvature
            y, val, _ = cubic_tridiag(lz.T(), gn, self.sigma)
            if lz.broke_down:
                break
            if gn > 0 and lz.betas[-1] * abs(float(y[-1])) <= g0["subproblem_tol"] * gn:
                break
        if gn == 0.0 and not lz.broke_down:
            y, val, _ = cubic_tridiag(lz.T(), 0.0, self.sigma)
        x = lz.combine(y.to(asq.dtype))
        if gn == 0.0:  # pick the escape direction's sign against the (tiny) gradient
            if float(torch.dot(flatten(grads, asq.dtype), asq * x)) > 0:
                x = -x
        return unflatten(asq * x, a), val, len(lz.alphas)

    def step(self, closure: Callable = None):
        params, g0, oracle, bp_per, info = self._begin(closure, {"sigma": self.sigma})
        loss0, grads = oracle.loss, oracle.grads
        if info["reason"]:
            return loss0
        backup = self._ellipsoid_backup(params)
        work, tot = self._init_subproblem(params, grads)
        unit = self._norm_unit
        if (g0["norm_scale"] == "initial_mean" and unit is None
                and any(g["norm"] != "spherical" for g in self.param_groups)):
            # the first step fixes the normaliser mean(a_0) (see norm_scale); one sync for both
            a_mean = torch.cat([x.reshape(-1) for x in work["a"]]).mean()
            rz0, gg, am = torch.cat([tot, a_mean.reshape(1).to(tot.dtype)]).tolist()
            unit = am if am > 0 and math.isfinite(am) else None
        else:
            rz0, gg = tot.tolist()
        if g0["norm_scale"] == "initial_mean" and unit is not None:
            torch._foreach_div_(work["a"], unit)
            torch._foreach_mul_(work["p"], unit)  # p = -A^{-1} g and g^T A^{-1} g scale by the unit
            rz0 *= unit
        matvec = lambda vs: oracle([v.to(p.dtype) for v, p in zip(vs, params)])
        zero_g = math.sqrt(gg) <= g0["grad_tol"] or rz0 <= 0.0
        try:
            if g0["subproblem"] == "lanczos" or zero_g:
                step_vec, model, iters = self._lanczos_step(matvec, params, work["a"], grads, zero_g, g0)
                reason = "lanczos"
            else:
                res = cubic_cg(matvec, grads, work["s"], work["r"], work["p"], work["a"], rz0, self.sigma,
                               g0["subproblem_max_iters"], g0["subproblem_tol"], fused=self.fused)
                step_vec, model, iters, reason = work["s"], res.model, res.iters, res.reason
        except _NonFiniteCurvature:
            model, iters = float("nan"), oracle.n_hvp
        if not math.isfinite(model):
            self._skip_curvature(oracle, bp_per, info, backup, iters)
            return loss0
        evaluated = self._ratio(closure, params, step_vec, loss0, model, iters, reason, oracle, bp_per, info,
                                backup)
        if evaluated is None:
            return loss0
        rho, trial, saved = evaluated
        accepted = rho >= g0["eta1"]
        if not accepted:
            self._restore(params, saved)
            self.sigma = self._raised_sigma(params, work["a"], rz0, g0)
            self.counters["rejected"] += 1
        else:
            self.counters["accepted"] += 1
            if rho >= g0["eta2"]:
                self.sigma = max(self.sigma / g0["gamma"], g0["sigma_min"])
        if g0["norm_scale"] == "initial_mean":
            self._norm_unit = unit  # fixed once a step completes (a skipped step changes nothing)
        info.update(rho=rho, accepted=accepted, trial_loss=trial, sigma=self.sigma)
        self._finish(oracle, bp_per, info)
        return loss0

    def _raised_sigma(self, params, a, rz0: float, g0) -> float:
        """gamma * sigma, capped where the cubic step ||s||_A ~ sqrt(||g||_{A^-1} / sigma) falls
        below the dtype's resolution eps * ||x||_A: sigma_max = ||g||_{A^-1} / (eps ||x||_A)^2;
        a cap hit is counted in ``counters['resolution_limit_hits']``."""
        new = self.sigma * g0["gamma"]
        floor, _ = self._resolution(params, a)
        if floor > 0 and math.isfinite(rz0) and rz0 > 0:
            ceiling = math.sqrt(rz0) / (floor * floor)
            if new > ceiling:
                self.counters["resolution_limit_hits"] += 1
                return max(self.sigma, min(ceiling, new))
        return new

    def extra_state(self) -> dict:
        st = super().extra_state()
        st["sigma"] = self.sigma
        st["norm_unit"] = self._norm_unit
        return st

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.sigma = float(state["sigma"])
        unit = state["norm_unit"]
        self._norm_unit = None if unit is None else float(unit)
