"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: an adaptive second
order optimizer for machine learning", 2020, Algorithm 1) and the hybrid SGD-momentum -> AdaHessian
optimizer of Attias, Cadei & Novakovic, "Discussion on the viability of a modern second order method
in non-convex optimization training a deep convolutional neural network" (EPFL, undated; "Attias et
al." below, whose equation numbers are used; both papers write the same eqs. 8-10).

AdaHessian preconditions Adam's bias-corrected first moment with a running root-mean-square of
the spatially averaged Hessian diagonal:

    D      = z * (H z),  z ~ Rademacher                      (eq. 8, Hutchinson; n probes averaged)
    D^(s)  = mean of D over each conv kernel / block of b     (eq. 9, the signed D)
    m_t    = beta1 m + (1 - beta1) g,       m^ = m_t / (1 - beta1^t)            (eq. 3)
    v_h    = beta2 v + (1 - beta2) D^(s)^2, v^ = v_h / (1 - beta2^h)            (eq. 10)
    x     <- x - lr (m^ / (v^^(k/2) + eps) + weight_decay x)   (Hessian power k, decoupled decay)

Where each default comes from: AdaHessian's are Yao et al.'s (lr 0.15, their CIFAR-10 ResNet
setting; betas (0.9, 0.999); Hessian power 1; eps 1e-4 from their released code, Algorithm 1 has
none); HybridSGDAdaHessian's are Attias et al.'s Section III-B / Table I numbers (tl 1.0; SGD lr
0.005, momentum 0.9 in torch.optim.SGD's form, which is what produced Table I; AdaHessian lr 0.001).
``practical()`` gives the released implementations' mean |D| (Yao et al.'s code and the
torch_optimizer package Attias et al. ran); see README, "Defaults and the papers".
"""
from __future__ import annotations

import math

from typing import Callable, Dict, List, Optional, Tuple

import torch

from natasha_ext.curvature.hutchinson import rademacher_probe
from natasha_ext.curvature.hvp import (HVP, ONE_PROBE_HVP_METHODS, double_backward, evaluate_closure, gradient_and_hvp,
                                       gradients)
from natasha_ext.ops import adahessian as aops
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import NatashaOptimizer, shared_args_doc
from natasha_ext.precision import accumulation_dtype


class _GraphHVP:
    """H v from gradients that carry their graph (``loss.backward(create_graph=True)``)."""

    def __init__(self, graph_grads: List[torch.Tensor], params: List[torch.Tensor]):
        self.g, self.params = graph_grads, params

    def __call__(self, v: List[torch.Tensor]) -> List[torch.Tensor]:
        return double_backward(self.g, self.params, v)

    def release(self) -> None:
        self.g = None


@shared_args_doc
class AdaHessian(NatashaOptimizer):
    r"""AdaHessian with a fused update kernel and Hutchinson probes from the optimizer's Philox stream.

    Defaults are Yao et al.'s (Algorithm 1; lr 0.15 of their CIFAR-10 ResNet runs; eps from their
    released code). ``AdaHessian.practical(params, **overrides)`` is the same with the released
    code's mean |D| (``abs_before_average=True``).

    Args:
        params: parameters or param groups.
        lr: learning rate (default 0.15, Yao et al.; Attias et al.'s Table I used 0.1).
        betas: (beta1, beta2) of the gradient and Hessian-diagonal moments (default (0.9, 0.999)).
        eps: added to the preconditioner (default 1e-4, Yao et al.'s code).
        weight_decay: decoupled weight decay (AdamW-style, default 0).
        hessian_power: k in v^(k/2), in (0, 1] (default 1).
        update_each: recompute the Hessian diagonal every ``update_each`` steps; in between the
            second moment is reused as is (only the first moment and the parameters move), which
            amortises the HVP. The second moment's bias correction counts curvature updates.
        n_samples: Hutchinson probes averaged per curvature update (default 1).
        block_size: the paper's block average b for 1-D/2-D tensors (default None: none). Conv
            weights (3-D and more) always average over their kernel dims.
        hvp: 'exact' (double backward), 'forward_over_reverse' (exact too: Pearlmutter's
            R-operator, the probe riding on the closure's own evaluation as a forward-mode
            tangent; no double-backward graph; one probe, so n_samples=1; faster where the
            double backward wastes work, e.g. LeNet-5, see README "Performance") or
            'finite_difference' (one extra gradient per probe). The last two in closure mode
            only; drop-in steps differentiate the graph they are given. 'auto' (default): exact,
            or finite differences for a closure that calls backward itself (see
            :mod:`natasha_ext.curvature.hvp`).
        abs_before_average: False (default, the papers' eq. 9): D^(s) = the mean of the signed
            D over each block, an unbiased estimate of the block's mean Hessian diagonal (eq. 10
            squares it). True: mean |D|, what Yao et al.'s released code (and the torch_optimizer
            package that Attias et al. ran) computes; it never lets a block's D^(s) cancel to ~0
            (a step of lr / eps), at the price of a bias upward. :meth:`practical` sets it.
        {shared_args}
        With a process group, closure mode averages the gradients and Hessian-vector products and
        the probes' seed is shared (same as ``distributed.attach(opt, group)``).

    Two ways to call it:
      * ``opt.step(closure)`` with ``closure()`` returning the loss *without* calling backward;
        the optimizer differentiates and frees every graph before returning (returns the loss).
      * drop-in: ``loss.backward(create_graph=True); opt.step()``; the HVP uses the graph left in
        ``p.grad`` and the optimizer detaches ``p.grad`` afterwards, so no graph outlives the step.
        ``opt.needs_create_graph`` says whether the next step computes curvature (with
        ``update_each > 1`` the other steps need only ``loss.backward()``).

    Steps whose gradient or probes hold NaN/inf are skipped (``counters['skipped_steps']``).
    """

    COUNTERS = ("steps", "gradients", "hvps", "hessian_updates", "skipped_steps")
    ACCUMULATION_STATE = ("exp_avg", "exp_hessian_diag_sq", "momentum_buffer")

    def __init__(self, params, lr: float = 0.15, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, update_each: int = 1, n_samples: int = 1,
                 block_size: Optional[int] = None, hvp: str = "auto", abs_before_average: bool = False,
                 fd_eps: float = 1e-4, seed: Optional[int] = None, fused: Optional[bool] = None,
                 raise_on_nonfinite: bool = False, process_group=None, _extra_defaults: Optional[dict] = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                        block_size=block_size)
        defaults.update(_extra_defaults or {})
        self._check_group(defaults)
        V.positive("lr", lr)  # at construction > 0; a scheduler may later bring it to 0
        defaults["betas"] = tuple(betas)
        V.positive_int("update_each", update_each)
        V.positive_int("n_samples", n_samples)
        V.choice("hvp", hvp, ONE_PROBE_HVP_METHODS)
        if hvp == "forward_over_reverse" and n_samples != 1:
            raise ValueError(f"n_samples: hvp='forward_over_reverse' carries one probe per closure evaluation, so "
                             f"n_samples must be 1, got {n_samples} (use hvp='exact' for several probes)")
        V.positive("fd_eps", fd_eps)
        super().__init__(params, defaults, fused=fused, seed=seed, raise_on_nonfinite=raise_on_nonfinite,
                         process_group=process_group)
        self.update_each, self.n_samples, self.hvp = update_each, n_samples, hvp
        self.abs_before_average, self.fd_eps = bool(abs_before_average), fd_eps
        self._unused: set = set()  # ids of the params this step's loss does not reach

    #: :meth:`practical`: the released implementations' D^(s) = mean |D| (Yao et al.'s code and
    #: torch_optimizer's), every other default as is
    PRACTICAL = dict(abs_before_average=True)

    @classmethod
    def _check_group(cls, group: dict) -> None:
        V.nonnegative("lr", group["lr"])  # 0 is a valid value (LR schedulers reach it)
        V.betas(group["betas"])
        V.positive("eps", group["eps"])
        V.nonnegative("weight_decay", group["weight_decay"])
        V.in_range("hessian_power", group["hessian_power"], 0.0, 1.0, low_open=True, high_open=False)
        if group["block_size"] is not None:
            V.positive_int("block_size", group["block_size"])

    # ------------------------------------------------------------------ schedule
    def _schedule_steps(self) -> int:
        """Steps counted by the ``update_each`` schedule."""
        return int(self.counters["steps"])

    def _curvature_due(self, params: List[torch.Tensor]) -> bool:
        if self._schedule_steps() % self.update_each == 0:
            return True
        # a parameter without a second moment yet (new group, grad None until now) needs one
        return any(int(self.state[p].get("hessian_step", 0)) == 0 for p in params)

    @property
    def needs_create_graph(self) -> bool:
        """Whether the next ``step()`` computes curvature (drop-in users pass it to backward)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        return self._curvature_due(params)

    # ------------------------------------------------------------------ step
    def _active(self, with_closure: bool) -> List[Tuple[dict, List[torch.Tensor]]]:
        out = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if (p.requires_grad if with_closure else p.grad is not None)]
            if ps:
                out.append((group, ps))
        return out

    def _units(self, groups, split_unused: bool = True) -> List[Tuple[dict, List[int], bool]]:
        """Kernel calls: params of one group that share their step counts (bias corrections)
        and, with ``split_unused``, whether the loss reaches them; (group, indices into the flat
        active list, unused). Probes are drawn per unit of ``split_unused=False`` (known before
        the loss is: forward over reverse draws first)."""
        units, k = [], 0
        for group, ps in groups:
            buckets: Dict[Tuple[int, int, bool], List[int]] = {}
            for p in ps:
                st = self.state.get(p, {})  # no empty entries: a step that raises leaves state as it was
                key = (int(st.get("step", 0)), int(st.get("hessian_step", 0)),
                       split_unused and id(p) in getattr(self, "_unused", ()))
                buckets.setdefault(key, []).append(k)
                k += 1
            units += [(group, idx, key[2]) for key, idx in buckets.items()]
        return units

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One AdaHessian step; see the class docstring for the closure and drop-in modes."""
        groups = self._active(closure is not None)
        params = [p for _, ps in groups for p in ps]
        self._unused = set()
        if not params:
            if closure is None:
                raise self.no_closure_no_gradients("call loss.backward(create_graph=True) before step()")
            return evaluate_closure(closure).detach()
        due = self._curvature_due(params)
        rng = self.rng.state_dict()
        try:
            loss, grads, curv, offsets, mode = self._gradients_and_curvature(closure, groups, params, due)
        except BaseException:
            self.rng.load_state_dict(rng)  # a failed closure or HVP leaves the stream where it was
            raise
        bad = None
        gc_norm = self.list_norms(grads + curv)[0]  # inf when a value is not finite
        if not math.isfinite(gc_norm):
            bad = "gradients or Hessian-vector products" if due else "gradients"
        elif not self._apply(groups, params, grads, curv, offsets, mode, gc_norm):
            bad = "the updated parameters (the update overflows their dtype)"
        if bad is not None:
            self.rng.load_state_dict(rng)  # a skipped step draws nothing: the stream is where it was
            self.skip_nonfinite(bad)
            return loss
        self.counters["steps"] += 1
        if due:
            self.counters["hessian_updates"] += 1
        return loss

    def _draw_probe(self, params, draws) -> Tuple[List[torch.Tensor], Dict[int, int]]:
        """One Rademacher z per parameter, drawn per unit of ``draws``; returns z and the Philox
        offset of each draw (from which the kernels regenerate z instead of storing it)."""
        z: List[Optional[torch.Tensor]] = [None] * len(params)
        offsets: Dict[int, int] = {}
        for ui, (_, idx, _) in enumerate(draws):
            zu, offsets[ui] = rademacher_probe([params[i] for i in idx], self.rng, self.fused)
            for i, zi in zip(idx, zu):
                z[i] = zi
        return z, offsets

    def _gradients_and_curvature(self, closure, groups, params, due):
        """Gradient, and on curvature steps the curvature the kernels take: Hz (one probe) or the
        averaged D (several probes) per parameter, the Philox offset of each kernel call's probe,
        and the kernels' curvature mode. Leaves no graph alive."""
        engine, loss, n = None, None, self.n_samples
        curv: List[torch.Tensor] = []
        offsets: Dict[int, int] = {}
        draws = self._units(groups, split_unused=False)
        if closure is not None and due and self.hvp == "forward_over_reverse":
            z, offsets = self._draw_probe(params, draws)  # the probe rides on the closure's evaluation
            unused: List[int] = []
            loss, grads, hz = gradient_and_hvp(closure, params, z, unused=unused)
            del z
            self._unused = {id(params[i]) for i in unused}
            self.counters["gradients"] += 1
            self.counters["hvps"] += 1
            return (loss, grads) + self._one_probe(draws, hz, offsets)
        try:
            if closure is not None:
                unused = []
                if due:
                    engine = HVP(closure, params, method=self.hvp, fd_eps=self.fd_eps)
                    grads, loss, unused = engine.grads, engine.loss, engine.unused
                else:
                    out = evaluate_closure(closure)
                    grads, loss = gradients(out, params, unused=unused), out.detach()
                    del out
                # params the loss does not reach: zero gradient and curvature; their own kernel
                # call skips the weight decay, so they stay put (as with torch.optim's grad None)
                self._unused = {id(params[i]) for i in unused}
                self.counters["gradients"] += 1
            else:
                self.check_grads(params)
                raw = [p.grad for p in params]
                if due:
                    if not any(g.requires_grad for g in raw):
                        raise RuntimeError(
                            f"{type(self).__name__}.step() without a closure needs the gradient's graph on "
                            "curvature steps: call loss.backward(create_graph=True) (see "
                            "opt.needs_create_graph), or pass step(closure)")
                    engine = _GraphHVP(raw, params)
                grads = [g.detach() for g in raw]
                del raw
            if due:
                if n > 1:
                    curv = [self.accumulation_zeros(p) for p in params]
                for s in range(n):
                    z, offsets = self._draw_probe(params, draws)
                    hz = engine(z)
                    del z  # regenerated from (seed, offset) by the kernels
                    if n == 1:
                        curv = [h.detach() for h in hz]
                    else:
                        for ui, (_, idx, _) in enumerate(draws):
                            aops.hutchinson_diag_([curv[i] for i in idx], [hz[i].detach() for i in idx],
                                                  self.rng.seed, offsets[ui], alpha=1.0 / n, accumulate=s > 0,
                                                  fused=self.fused)
                    del hz
                self.counters["hvps"] += n
                if closure is not None and engine.method == "finite_difference":
                    self.counters["gradients"] += n
        finally:
            if engine is not None:
                engine.release()
            if closure is None:
                # drop-in mode: cut the create_graph=True graph out of p.grad (it refers back to
                # the parameters and would otherwise live until the next zero_grad)
                for p in params:
                    if p.grad is not None and p.grad.grad_fn is not None:
                        p.grad = p.grad.detach()
        if not due:
            return loss, grads, curv, offsets, aops.CURV_NONE
        if n == 1:
            return (loss, grads) + self._one_probe(draws, curv, offsets)
        return loss, grads, curv, {}, aops.CURV_DIAG

    def _one_probe(self, draws, hz, offsets):
        """(curvature, offsets, mode) for the kernels from one probe's Hz. They regenerate z
        from the draws' offsets when their calls are the draws; when the loss misses some
        parameters, those get calls of their own (see :meth:`_units`), so D = z * Hz is formed
        here per draw and the kernels take D."""
        if not self._unused:
            return hz, offsets, aops.CURV_HZ
        diag = [self.accumulation_zeros(h) for h in hz]
        for ui, (_, idx, _) in enumerate(draws):
            aops.hutchinson_diag_([diag[i] for i in idx], [hz[i] for i in idx], self.rng.seed, offsets[ui],
                                  alpha=1.0, accumulate=False, fused=self.fused)
        return diag, {}, aops.CURV_DIAG

    #: margin of the in-place bound below the dtypes' largest finite values (rounding of the
    #: bounded quantities, and the L2 norms' own rounding)
    IN_PLACE_MARGIN = 4.0

    @torch.no_grad()
    def _apply(self, groups, params, grads, curv, offsets, mode, gc_norm: float) -> bool:
        """The update. In place when :meth:`_in_place_is_safe` proves it stays finite (the usual
        case); otherwise computed into copies of the parameters and moments, checked for overflow
        (one reduction over the new parameters) and only then copied in, so that an update that
        overflows the parameters' dtype (fp16 with a large lr) writes nothing. Returns False when
        it did not write."""
        if self._in_place_is_safe(groups, params, gc_norm):
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p].update(exp_avg=self.accumulation_zeros(p),
                                         exp_hessian_diag_sq=self.accumulation_zeros(p))
            moments = {p: (self.state[p]["exp_avg"], self.state[p]["exp_hessian_diag_sq"]) for p in params}
            self._update(groups, params, grads, curv, offsets, mode, {p: p for p in params}, moments)
            self._count_step(params, mode != aops.CURV_NONE)
            return True
        fresh = {}
        for p in params:
            st = self.state[p]
            if "exp_avg" in st:
                fresh[p] = (st["exp_avg"].clone(), st["exp_hessian_diag_sq"].clone())
            else:
                fresh[p] = (self.accumulation_zeros(p), self.accumulation_zeros(p))
        new_params = {p: p.detach().clone() for p in params}
        self._update(groups, params, grads, curv, offsets, mode, new_params, fresh)
        if not self.all_finite(list(new_params.values())):
            return False
        for p in params:
            self.state[p]["exp_avg"], self.state[p]["exp_hessian_diag_sq"] = fresh[p]
        self._count_step(params, mode != aops.CURV_NONE)
        torch._foreach_copy_(params, list(new_params.values()))
        return True

    def _in_place_is_safe(self, groups, params, gc_norm: float) -> bool:
        """Whether this step's update provably keeps parameters and moments finite, from list norms
        (an L2 norm bounds every |element|; one host sync): |m'| <= max(|m|, |g|),
        v' <= max(v) + max(D^(s))^2 with |D^(s)| <= max|Hz| (|z| = 1), the denominator >= eps, so
        |p' - p| <= lr (max|m'| / bc1 / eps + weight_decay |p|) with bc1 >= 1 - beta1. With the
        bound (times IN_PLACE_MARGIN) below the largest finite value of every parameter dtype and
        of the moments' dtype, the kernel can write in place; the copies of the other path cost
        three more passes over the parameters and moments than the update itself."""
        m = [self.state[p]["exp_avg"] for p in params if "exp_avg" in self.state[p]]
        v = [self.state[p]["exp_hessian_diag_sq"] for p in params if "exp_hessian_diag_sq" in self.state[p]]
        p_norm, m_norm, v_norm = self.list_norms(params, m, v)
        gs = [g for g, _ in groups]
        lr, eps = max(float(g["lr"]) for g in gs), min(float(g["eps"]) for g in gs)
        wd, bc1 = max(float(g["weight_decay"]) for g in gs), 1.0 - max(float(g["betas"][0]) for g in gs)
        m_bound = max(m_norm, gc_norm) / bc1 / eps
        p_bound = p_norm + lr * (m_bound + wd * p_norm)
        v_bound = v_norm + gc_norm * gc_norm
        p_max = min(torch.finfo(p.dtype).max for p in params)
        acc_max = min(torch.finfo(t.dtype).max for t in m + v) if m else torch.finfo(torch.float32).max
        k = self.IN_PLACE_MARGIN
        return (math.isfinite(p_bound) and math.isfinite(v_bound) and k * p_bound < p_max
                and k * max(m_bound, v_bound, p_bound) < acc_max)

    def _update(self, groups, params, grads, curv, offsets, mode, targets, moments) -> None:
        """The adahessian_step kernel of every unit, writing ``targets[p]`` and ``moments[p]``."""
        due = mode != aops.CURV_NONE
        for ui, (group, idx, unused) in enumerate(self._units(groups)):
            ps = [params[i] for i in idx]
            st = self.state[ps[0]]
            t, h = int(st.get("step", 0)) + 1, int(st.get("hessian_step", 0)) + int(due)
            beta1, beta2 = group["betas"]
            aops.adahessian_step(
                [targets[p] for p in ps], [grads[i] for i in idx], [moments[p][0] for p in ps],
                [moments[p][1] for p in ps], [curv[i] for i in idx] if due else [],
                [aops.spatial_group_size(p.shape, group["block_size"]) for p in ps],
                curv_mode=mode, abs_first=self.abs_before_average, seed=self.rng.seed, offset=offsets.get(ui, 0),
                lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=0.0 if unused else group["weight_decay"], hessian_power=group["hessian_power"],
                bias_correction1=1.0 - beta1 ** t, bias_correction2=1.0 - beta2 ** h, fused=self.fused)

    def _count_step(self, params, due) -> None:
        for p in params:
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
                st["hessian_step"] = torch.tensor(0.0)
            st["step"] += 1
            if due:
                st["hessian_step"] += 1


SGD_MOMENTUM_FORMS = ("torch", "paper")


@shared_args_doc
class HybridSGDAdaHessian(AdaHessian):
    r"""SGD with momentum until the validation loss falls below ``switch_threshold``, then AdaHessian.

    Attias et al.'s HYBRID (Section II, end; Section III-B): first-order steps while far from an
    optimum (cheap, and the Hessian is poorly conditioned there), second-order steps once the
    validation loss the user reports via :meth:`report_validation_loss` (once per epoch) drops
    strictly below tl (``switch_threshold``). The training CLI reports the epoch's validation loss,
    and the epoch's *training* loss when the run has no validation set (a different test: the
    training loss falls below tl sooner).

    SGD phase, ``sgd_momentum_form``:
      * ``'torch'`` (default): ``buf <- momentum buf + g`` (``buf = g`` at the first step),
        ``x <- x - sgd_lr buf``: torch.optim.SGD's form, the one that produced Attias et al.'s
        Table I (their code builds ``torch.optim.SGD(lr=0.005, momentum=0.9)``; short runs of
        both forms beside Table I: reports/adahessian_sgd_form).
      * ``'paper'``: eq. 2 as printed, ``m <- momentum m + (1 - momentum) g`` (m = 0 before the
        first step), ``x <- x - sgd_lr m``: at the same sgd_lr a (1 - momentum) = 10x smaller
        effective step.
    AdaHessian phase: fresh moments, :class:`AdaHessian` with ``lr``, ``betas`` ... Defaults are
    Attias et al.'s Table I hyperparameters (tl 1.0; sgd_lr 0.005, momentum 0.9; lr 0.001, betas
    (0.9, 0.999)); eps and the Hessian power are those of their AdaHessian (1e-4, 1), D^(s) is
    eq. 9's (see :class:`AdaHessian`, and :meth:`AdaHessian.practical` for mean |D|).
    ``switch_step`` / ``switch_epoch`` record when the switch happened (None before); both and
    the phase survive ``state_dict`` round trips.

    Args: switch_threshold, sgd_lr, momentum, sgd_momentum_form, and those of :class:`AdaHessian`:
        {shared_args}
    """

    COUNTERS = AdaHessian.COUNTERS + ("sgd_steps",)

    def __init__(self, params, switch_threshold: float = 1.0, sgd_lr: float = 0.005, momentum: float = 0.9,
                 lr: float = 0.001, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-4,
                 weight_decay: float = 0.0, hessian_power: float = 1.0, update_each: int = 1, n_samples: int = 1,
                 block_size: Optional[int] = None, hvp: str = "auto", abs_before_average: bool = False,
                 sgd_momentum_form: str = "torch", fd_eps: float = 1e-4, seed: Optional[int] = None,
                 fused: Optional[bool] = None, raise_on_nonfinite: bool = False, process_group=None):
        V._num("switch_threshold", switch_threshold)
        V.positive("sgd_lr", sgd_lr)
        V.choice("sgd_momentum_form", sgd_momentum_form, SGD_MOMENTUM_FORMS)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         hessian_power=hessian_power, update_each=update_each, n_samples=n_samples,
                         block_size=block_size, hvp=hvp, abs_before_average=abs_before_average, fd_eps=fd_eps,
                         seed=seed, fused=fused, raise_on_nonfinite=raise_on_nonfinite, process_group=process_group,
                         _extra_defaults=dict(sgd_lr=sgd_lr, momentum=momentum))
        self.switch_threshold = float(switch_threshold)
        self.sgd_momentum_form = sgd_momentum_form
        self.phase = "sgd"
        self.switch_step: Optional[int] = None
        self.switch_epoch: Optional[int] = None
        self.validation_reports = 0

    @classmethod
    def _check_group(cls, group: dict) -> None:
        super()._check_group(group)
        V.nonnegative("sgd_lr", group["sgd_lr"])
        V.in_range("momentum", group["momentum"], 0.0, 1.0)

    def report_validation_loss(self, loss, epoch: Optional[int] = None) -> bool:
        """Tell the optimizer the current validation loss; switches to AdaHessian (and returns
        True) the first time it is strictly below ``switch_threshold``. ``epoch`` defaults to
        the number of reports so far (this one included)."""
        self.validation_reports += 1
        value = float(loss)
        if self.phase == "sgd" and value < self.switch_threshold:
            self.phase = "adahessian"
            self.switch_step = int(self.counters["steps"])
            self.switch_epoch = int(epoch) if epoch is not None else self.validation_reports
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p].pop("momentum_buffer", None)
            return True
        return False

    def _schedule_steps(self) -> int:
        return int(self.counters["steps"]) - (self.switch_step or 0)

    @property
    def needs_create_graph(self) -> bool:
        return self.phase == "adahessian" and super().needs_create_graph

    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        if self.phase == "adahessian":
            return super().step(closure)
        groups = self._active(closure is not None)
        params = [p for _, ps in groups for p in ps]
        loss, unused = None, []
        if closure is not None:
            out = evaluate_closure(closure)
            grads, loss = (gradients(out, params, unused=unused) if params else []), out.detach()
            del out
        else:
            self.check_grads(params)
            grads = [p.grad.detach() for p in params]
            for p in params:
                if p.grad.grad_fn is not None:
                    p.grad = p.grad.detach()
        if not params:
            if closure is None:
                raise self.no_closure_no_gradients("call loss.backward() before step()")
            return loss
        skip_decay = {id(params[i]) for i in unused}  # the loss does not reach them: leave them alone
        self.counters["gradients"] += 1
        if not self.all_finite(grads):
            self.skip_nonfinite("gradients")
            return loss
        k = 0
        with torch.no_grad():
            for group, ps in groups:
                gs = grads[k:k + len(ps)]
                k += len(ps)
                if group["weight_decay"]:
                    gs = [g if id(p) in skip_decay else g.add(p, alpha=group["weight_decay"]) for p, g in zip(ps, gs)]
                bufs = []
                for p, g in zip(ps, gs):
                    bufs.append(self._momentum_update(self.state[p], g.to(accumulation_dtype(p)), group["momentum"]))
                lr = -float(group["sgd_lr"])
                if all(p.dtype == b.dtype for p, b in zip(ps, bufs)):
                    torch._foreach_add_(ps, bufs, alpha=lr)
                else:  # low precision: x + (-lr) buf in fp32, rounded once
                    for p, b in zip(ps, bufs):
                        p.copy_(p.to(b.dtype).add_(b, alpha=lr))
        self.counters["steps"] += 1
        self.counters["sgd_steps"] += 1
        return loss

    def _momentum_update(self, st: dict, g: torch.Tensor, mu: float) -> torch.Tensor:
        """The SGD phase's momentum buffer after gradient ``g`` (in the buffer's dtype: fp32 for
        fp16/bf16 params), in the chosen ``sgd_momentum_form``."""
        buf = st.get("momentum_buffer")
        if self.sgd_momentum_form == "paper":  # eq. 2: m <- mu m + (1 - mu) g, m = 0 before step 1
            if buf is None:
                buf = st["momentum_buffer"] = torch.zeros_like(g)
            return buf.mul_(mu).add_(g, alpha=1.0 - mu)
        if buf is None:  # torch.optim.SGD: buf = g at the first step, then mu buf + g
            st["momentum_buffer"] = g.detach().clone()
            return st["momentum_buffer"]
        return buf.mul_(mu).add_(g)

    def extra_state(self) -> dict:
        sd = super().extra_state()
        sd["hybrid"] = {"phase": self.phase, "switch_step": -1 if self.switch_step is None else self.switch_step,
                        "switch_epoch": -1 if self.switch_epoch is None else self.switch_epoch,
                        "validation_reports": self.validation_reports}
        return sd

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        h = state["hybrid"]
        self.phase = h["phase"]
        self.switch_step = None if h["switch_step"] < 0 else int(h["switch_step"])
        self.switch_epoch = None if h["switch_epoch"] < 0 else int(h["switch_epoch"])
        self.validation_reports = int(h["validation_reports"])
