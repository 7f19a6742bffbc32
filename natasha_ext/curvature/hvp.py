"""Gradients and Hessian-vector products from a loss closure: the engines every second-order
optimizer of the package shares.

Two closure conventions, told apart at every evaluation (see :func:`watching`):

* the package's: ``closure()`` evaluates the loss on the current minibatch and returns it
  *without* calling backward; the engines differentiate with ``torch.autograd.grad`` and keep no
  graph alive after they return (no ``create_graph=True`` leak into ``.grad``). Every engine
  works with it.
* torch.optim's (``torch.optim.LBFGS``, PyTorch Lightning's automatic optimization):
  ``closure()`` zeroes the gradients, evaluates the loss, calls ``backward()`` and returns the
  loss (with or without its spent graph). The gradient is then read from ``.grad``; a
  Hessian-vector product is a finite difference of two such gradients (``hvp='auto'`` picks it,
  ``hvp='exact'`` is refused: the graph is gone); a loss-only evaluation (a trial point) runs the
  closure with grad enabled, since its backward needs the graph; Gauss-Newton products, which
  need the outputs' graph, are refused.

Inside an optimizer's ``step()`` the parameters' ``.grad`` are set to None before each closure
call and read afterwards: a closure that wrote a gradient ran backward (a package-convention
closure never does, whether or not its loss has a ``grad_fn``). The first evaluation of a step
leaves its gradient in ``.grad`` (as ``loss.backward(); opt.step()`` would); later ones (finite
differences, snapshots, trial points) put ``.grad`` back as it was. Each evaluation's gradient is
that evaluation's alone, so gradient accumulation across calls (Lightning's
``accumulate_grad_batches > 1``) is not supported.

Multi-process: while an optimizer with a process group runs ``step()`` (see
:mod:`natasha_ext.distributed`), the gradients and HVPs these engines return are averaged across
the ranks (one bucketed collective each); graph-carrying gradients (``create_graph=True``) are
left local, since what is differentiated afterwards is averaged instead.

Loss scaling (fp16 training): inside ``loss_scale(S)`` the engines differentiate ``S * loss``
and divide the result by ``S`` (``natasha_ext.amp.scaled_step`` drives it from a
``torch.amp.GradScaler``); an overflow shows up as inf/NaN in the unscaled gradient, which the
optimizers' non-finite check turns into a skipped step. A closure that calls backward itself
differentiates its own, unscaled loss: refused inside ``loss_scale``.

Engines:
  * ``'exact'``: double backward, Hv = d(g.v)/dx on the graph of g (one extra backward).
  * ``'forward_over_reverse'``: Pearlmutter's R-operator (Pearlmutter, "Fast exact multiplication
    by the Hessian", Neural Computation 1994): the closure runs with the parameters carrying the
    tangent v (forward-mode AD), and the backward pass that gives g carries H v along as g's
    tangent. Exact like the double backward, but one probe per closure evaluation
    (:func:`gradient_and_hvp`), so only for optimizers that draw one probe per step
    (``ONE_PROBE_HVP_METHODS``). It builds no double-backward graph, and it skips work PyTorch's
    double backward does unconditionally (the conv double backward forms the input gradient of
    the first layer, through a transposed convolution, even though the input needs none).
  * ``'finite_difference'``: Hv ~ (g(x + q v) - g(x)) / q, one extra gradient; the parameters
    are restored bit-exactly afterwards.
  * ``'auto'``: ``'exact'`` for the package's closures, ``'finite_difference'`` for closures that
    call backward.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable, List, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from natasha_ext import distributed

HVP_METHODS = ("auto", "exact", "finite_difference")
#: the engines of optimizers that need one H v per closure evaluation (AdaHessian with one probe)
ONE_PROBE_HVP_METHODS = HVP_METHODS + ("forward_over_reverse",)

_LOSS_SCALE: contextvars.ContextVar = contextvars.ContextVar("natasha_ext_loss_scale", default=None)
_WATCH: contextvars.ContextVar = contextvars.ContextVar("natasha_ext_closure_watch", default=None)

#: the two conventions, as the errors state them
PACKAGE_CONVENTION = "return the loss without calling backward (the optimizer differentiates it)"
BACKWARD_CONVENTION = "zero the gradients, call loss.backward() and return the loss (torch.optim's convention)"


@contextlib.contextmanager
def loss_scale(scale: Optional[float]):
    """Differentiate ``scale * loss`` inside the block (gradients returned unscaled)."""
    token = _LOSS_SCALE.set(None if scale is None or float(scale) == 1.0 else float(scale))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


class _Watch:
    """The parameters whose ``.grad`` tell the conventions apart during one step, and whether
    an evaluation of this step has already left its gradient in ``.grad``."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params, self.kept = [p for p in params if p.requires_grad], False


@contextlib.contextmanager
def watching(params: Sequence[torch.Tensor]):
    """Recognise closures that call backward among the evaluations inside the block (every
    optimizer's ``step()`` runs in one, over its parameters; see the module docstring)."""
    token = _WATCH.set(_Watch(params))
    try:
        yield
    finally:
        _WATCH.reset(token)


def _run(closure: Callable, grad: bool = True):
    """``closure()`` with the watched ``.grad`` set to None first; returns (output, the
    gradients it wrote by ``id`` of the parameter, or None when it wrote none)."""
    watch = _WATCH.get()
    params = watch.params if watch is not None else []
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    keep = False
    try:
        with torch.set_grad_enabled(grad):
            out = closure()
        written = {id(p): p.grad.detach() for p in params if p.grad is not None}
        if not written:
            return out, None
        keep = not watch.kept  # the step's first gradient stays in .grad, as after loss.backward()
        watch.kept = True
        if keep:
            for p in params:
                if p.grad is not None and p.grad.requires_grad:  # backward(create_graph=True): cut the graph
                    p.grad = p.grad.detach()
        return out, written
    finally:
        if not keep:
            for p, g in zip(params, saved):
                p.grad = g


def called_backward(loss: torch.Tensor) -> bool:
    """Whether ``loss`` came from a closure that called backward itself (gradient in ``.grad``)."""
    return hasattr(loss, "_closure_grads")


def evaluate_closure(closure: Optional[Callable[[], torch.Tensor]], who: str = "step") -> torch.Tensor:
    """Run the closure with grad enabled and check it returns a scalar loss that either carries
    its graph (package convention) or came with gradients in ``.grad`` (the closure called
    backward: the returned loss is detached and :func:`gradients` reads those)."""
    if closure is None:
        raise RuntimeError(f"{who}() needs a closure: closure() must evaluate the model on the current minibatch and "
                           f"either {PACKAGE_CONVENTION} or {BACKWARD_CONVENTION}")
    loss, written = _run(closure)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"closure must return a Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"closure must return a scalar loss, got shape {tuple(loss.shape)}")
    if written is not None:
        if _LOSS_SCALE.get() is not None:
            raise ValueError("loss scaling (natasha_ext.amp.scaled_step) scales the loss the optimizer differentiates, "
                             f"but the closure called backward() on its own loss: {PACKAGE_CONVENTION}")
        loss = loss.detach().reshape(())
        loss._closure_grads = written
        return loss
    if loss.grad_fn is None:
        raise ValueError("closure returned a tensor without grad_fn and wrote no gradient: either "
                         f"{PACKAGE_CONVENTION}, with the loss depending on the parameters through autograd (not under "
                         f"torch.no_grad, not .detach()ed), or {BACKWARD_CONVENTION}")
    with torch.enable_grad():  # a view taken under no_grad (e.g. a @torch.no_grad step) loses grad_fn
        return loss.reshape(())


def evaluate_loss(closure: Callable):
    """The closure's output where only the loss value is needed (a trial point): under no_grad,
    or, once this step has seen the closure call backward, with grad enabled (its backward needs
    the graph) and ``.grad`` put back afterwards."""
    watch = _WATCH.get()
    out, _ = _run(closure, grad=watch is not None and watch.kept)
    if isinstance(out, (tuple, list)):
        return type(out)(o.detach() if isinstance(o, torch.Tensor) else o for o in out)
    return out.detach() if isinstance(out, torch.Tensor) else out


def closure_output(closure: Callable, needs: str):
    """The raw output of a closure whose graph the caller differentiates itself (``needs`` names
    the setting that requires it); a closure that called backward is refused."""
    out, written = _run(closure)
    if written is not None:
        raise ValueError(f"{needs} needs the graph of the closure's outputs, but the closure called backward(), "
                         f"which frees it: {PACKAGE_CONVENTION}")
    return out


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False,
              retain_graph: Optional[bool] = None, unused: Optional[List[int]] = None) -> List[torch.Tensor]:
    """d loss / d params; parameters the loss does not reach get zeros. Averaged across the
    active process group unless ``create_graph``. When ``unused`` is a list, the indices of the
    parameters the loss does not reach are appended to it (not while a process group is active:
    another rank's loss may reach them), so an optimizer can leave them alone as torch.optim does.
    For a loss from a closure that called backward, the gradients it wrote to ``.grad``."""
    if called_backward(loss):
        if create_graph:
            raise ValueError(f"create_graph: the closure called backward(), so no graph is left; {PACKAGE_CONVENTION}")
        gs = [loss._closure_grads.get(id(p)) for p in params]
    else:
        scale = _LOSS_SCALE.get()
        gs = torch.autograd.grad(loss if scale is None else loss * scale, list(params), create_graph=create_graph,
                                 retain_graph=retain_graph, allow_unused=True)
        if scale is not None:  # unscale (differentiably when the graph is kept, so H v comes out unscaled)
            gs = [None if g is None else g / scale for g in gs]
    if unused is not None and distributed.active_group() is None:
        unused.extend(i for i, g in enumerate(gs) if g is None)
    gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    if create_graph:
        return gs
    return distributed.all_reduce_mean(gs)


def resolve_method(method: str, loss: torch.Tensor) -> str:
    """The HVP engine for ``method`` and the closure that produced ``loss`` ('auto': exact for
    the package convention, finite differences for a closure that called backward); ``method``
    was validated by :class:`HVP` before the closure ran."""
    if not called_backward(loss):
        return "exact" if method == "auto" else method
    if method == "exact":
        raise ValueError("hvp='exact' differentiates the loss's graph twice, but the closure called backward(), so no "
                         f"graph is left: pass hvp='finite_difference' (or 'auto'), or {PACKAGE_CONVENTION}")
    return "finite_difference"


class HVP:
    """Gradient at the current point plus a Hessian-vector-product oracle.

    >>> h = HVP(closure, params, method="exact")
    >>> h.loss, h.grads          # loss and gradient (detached)
    >>> hv = h(v)                # H v, as many times as needed
    >>> h.release()              # frees the double-backward graph (also on garbage collection)

    ``h.method`` is the engine in use ('auto' resolved by :func:`resolve_method`).
    """

    def __init__(self, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                 method: str = "exact", fd_eps: float = 1e-4):
        if method not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {method!r}")
        self.closure, self.params, self.fd_eps = closure, list(params), fd_eps
        self.n_hvp = 0
        self.n_grad = 1
        self.unused: List[int] = []  # indices of the params the loss does not reach (see gradients)
        loss = evaluate_closure(closure)
        self.method = method = resolve_method(method, loss)
        if method == "exact":
            self._g_graph = gradients(loss, self.params, create_graph=True, unused=self.unused)
            self.grads = distributed.all_reduce_mean([g.detach() for g in self._g_graph])
        else:
            self._g_graph = None
            self.grads = gradients(loss, self.params, unused=self.unused)
        self.loss = loss.detach()

    def __call__(self, v: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        self.n_hvp += 1
        if self.method == "exact":
            if self._g_graph is None:
                raise RuntimeError("HVP oracle used after release()")
            return distributed.all_reduce_mean(double_backward(self._g_graph, self.params, v))
        return finite_difference_hvp(self.closure, self.params, v, self.grads, self.fd_eps)

    def release(self) -> None:
        self._g_graph = None


def double_backward(graph_grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                    v: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """H v = d(g . v)/d params on the graph of gradients computed with ``create_graph=True``
    (kept for further products); zeros where g has no graph or does not reach a parameter."""
    live = [(g, vi) for g, vi in zip(graph_grads, v) if g.requires_grad]
    if not live:
        return [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        hv = torch.autograd.grad([g for g, _ in live], list(params), [vi for _, vi in live],
                                 retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _raised_in_backward_call(exc: BaseException) -> bool:
    """Whether ``exc`` came out of ``Tensor.backward`` / ``torch.autograd.backward`` (a closure of
    torch.optim's convention), from the frames of its traceback."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "backward" and frame.f_globals.get("__name__") in ("torch._tensor", "torch.autograd"):
            return True
        tb = tb.tb_next
    return False


def gradient_and_hvp(closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                     v: Sequence[torch.Tensor], unused: Optional[List[int]] = None):
    """(loss, g, H v) from one evaluation of a package-convention closure, forward over reverse:
    inside a forward-AD level each parameter gets the tangent ``v`` in place (its values are
    rewritten unchanged), the closure runs, and the gradient g = d loss / d params comes out as a
    dual tensor whose tangent is d g [v] = H v (Pearlmutter's R{g}). The tangents vanish with the
    level. Loss scaling, ``unused`` and the process-group averages are as in :func:`gradients`
    (one collective for g and H v together).

    The forward pass needs a forward-mode derivative of every operation (a clear error
    otherwise). Some of PyTorch's backward operations have none or a failing one (``mse_loss``
    with the default mean, ``huber_loss``, in torch 2.x): the product then comes from the
    double backward on the same forward graph (same H v, no second closure call), with a
    warning."""
    params = list(params)
    failed = None
    with fwAD.dual_level():
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.copy_(fwAD.make_dual(p.detach(), vi.to(p.dtype)))
        refused = ValueError("hvp='forward_over_reverse' differentiates the closure's loss itself, but the closure "
                             f"called backward(): {PACKAGE_CONVENTION}, or pass hvp='finite_difference' (or 'auto')")
        try:
            loss = evaluate_closure(closure)
        except (NotImplementedError, RuntimeError) as exc:
            if _raised_in_backward_call(exc):  # its backward met the tangents
                raise refused from exc
            raise RuntimeError(f"hvp='forward_over_reverse': an operation of the closure has no forward-mode "
                               f"derivative ({exc}); use hvp='exact'") from exc
        if called_backward(loss):
            raise refused
        scale = _LOSS_SCALE.get()
        try:
            gs = torch.autograd.grad(loss if scale is None else loss * scale, params, allow_unused=True,
                                     retain_graph=True)
            if unused is not None and distributed.active_group() is None:  # as gradients() reports them
                unused.extend(i for i, g in enumerate(gs) if g is None)
            duals = [(None, None) if g is None else fwAD.unpack_dual(g) for g in gs]
            grads = [torch.zeros_like(p) if g is None else g.detach() for p, (g, _) in zip(params, duals)]
            hvs = [torch.zeros_like(p) if t is None else t.detach() for p, (_, t) in zip(params, duals)]
            del gs, duals
            if scale is not None:
                grads, hvs = [g / scale for g in grads], [h / scale for h in hvs]
        except (NotImplementedError, RuntimeError) as exc:
            failed = exc
    if failed is not None:  # outside the level: the graph no longer carries tangents
        warnings.warn(f"hvp='forward_over_reverse': a backward operation's forward-mode derivative failed "
                      f"({failed}); this H v came from the double backward on the same graph", RuntimeWarning)
        graph = gradients(loss, params, create_graph=True, unused=unused)  # unscaled, zeros where unreached
        hvs = double_backward(graph, params, v)
        grads = [g.detach() for g in graph]
        del graph
    both = distributed.all_reduce_mean(grads + hvs)
    return loss.detach(), both[:len(params)], both[len(params):]


def finite_difference_hvp(closure, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                          grads: Sequence[torch.Tensor], eps: float = 1e-4) -> List[torch.Tensor]:
    """(g(x + eps v) - g(x)) / eps with the parameters restored bit-exactly afterwards.
    ``eps`` is scaled by 1/||v|| so the probe moves the parameters by ``eps`` in norm (for
    fp16/bf16 parameters by at least sqrt(u) (1 + ||x||), u the dtype's unit roundoff)."""
    vnorm = float(torch.sqrt(sum((vi.double() ** 2).sum() for vi in v)))
    if vnorm == 0.0:
        return [torch.zeros_like(p) for p in params]
    q = eps / vnorm
    low = [p.dtype for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    if low:
        # fp16/bf16 weights cannot move by much less than their resolution: a smaller step is
        # rounded away (Hv = 0) or quantised; take at least the forward-difference optimum
        # sqrt(u) (1 + ||x||) for the dtype's unit roundoff u
        u = max(torch.finfo(d).eps for d in low)
        xnorm = float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params)))
        q = max(eps, u ** 0.5 * (1.0 + xnorm)) / vnorm
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.add_(vi.to(p.dtype), alpha=q)
        g2 = gradients(evaluate_closure(closure), params)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return [(a - b) / q for a, b in zip(g2, grads)]
