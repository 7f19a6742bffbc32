"""Gradients and Hessian-vector products from a loss closure: the engines every second-order
optimizer of the package shares.

Closure convention: ``closure()`` evaluates the loss on the current minibatch and returns it
*without* calling backward; the engines differentiate with ``torch.autograd.grad`` and keep no
graph alive after they return (no ``create_graph=True`` leak into ``.grad``).

Multi-process: while an optimizer with a process group runs ``step()`` (see
:mod:`natasha_ext.distributed`), the gradients and HVPs these engines return are averaged across
the ranks (one bucketed collective each); graph-carrying gradients (``create_graph=True``) are
left local, since what is differentiated afterwards is averaged instead.

Loss scaling (fp16 training): inside ``loss_scale(S)`` the engines differentiate ``S * loss``
and divide the result by ``S`` (``natasha_ext.amp.scaled_step`` drives it from a
``torch.amp.GradScaler``); an overflow shows up as inf/NaN in the unscaled gradient, which the
optimizers' non-finite check turns into a skipped step.

Engines:
  * ``'exact'``: double backward, Hv = d(g.v)/dx on the graph of g (one extra backward).
  * ``'finite_difference'``: Hv ~ (g(x + q v) - g(x)) / q, one extra gradient; the parameters
    are restored bit-exactly afterwards.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, List, Optional, Sequence

import torch

from natasha_ext import distributed

HVP_METHODS = ("exact", "finite_difference")

_LOSS_SCALE: contextvars.ContextVar = contextvars.ContextVar("natasha_ext_loss_scale", default=None)


@contextlib.contextmanager
def loss_scale(scale: Optional[float]):
    """Differentiate ``scale * loss`` inside the block (gradients returned unscaled)."""
    token = _LOSS_SCALE.set(None if scale is None or float(scale) == 1.0 else float(scale))
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


def evaluate_closure(closure: Optional[Callable[[], torch.Tensor]], who: str = "step") -> torch.Tensor:
    """Run the closure with grad enabled and check it returns a differentiable scalar."""
    if closure is None:
        raise RuntimeError(f"{who}() needs a closure: closure() must evaluate the model on the current "
                           "minibatch and return the loss tensor (without calling backward)")
    with torch.enable_grad():
        loss = closure()
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"closure must return a Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"closure must return a scalar loss, got shape {tuple(loss.shape)}")
    if loss.grad_fn is None:
        raise ValueError("closure returned a tensor without grad_fn: the loss must depend on the "
                         "parameters through autograd (did it run under torch.no_grad or call .detach?)")
    with torch.enable_grad():  # a view taken under no_grad (e.g. a @torch.no_grad step) loses grad_fn
        return loss.reshape(())


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False,
              retain_graph: Optional[bool] = None, unused: Optional[List[int]] = None) -> List[torch.Tensor]:
    """d loss / d params; parameters the loss does not reach get zeros. Averaged across the
    active process group unless ``create_graph``. When ``unused`` is a list, the indices of the
    parameters the loss does not reach are appended to it (not while a process group is active:
    another rank's loss may reach them), so an optimizer can leave them alone as torch.optim does."""
    scale = _LOSS_SCALE.get()
    gs = torch.autograd.grad(loss if scale is None else loss * scale, list(params), create_graph=create_graph,
                             retain_graph=retain_graph, allow_unused=True)
    if unused is not None and distributed.active_group() is None:
        unused.extend(i for i, g in enumerate(gs) if g is None)
    gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    if scale is not None:  # unscale (differentiably when the graph is kept, so H v comes out unscaled)
        gs = [g / scale for g in gs]
    if create_graph:
        return gs
    return distributed.all_reduce_mean(gs)


class HVP:
    """Gradient at the current point plus a Hessian-vector-product oracle.

    >>> h = HVP(closure, params, method="exact")
    >>> h.loss, h.grads          # loss and gradient (detached)
    >>> hv = h(v)                # H v, as many times as needed
    >>> h.release()              # frees the double-backward graph (also on garbage collection)
    """

    def __init__(self, closure: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                 method: str = "exact", fd_eps: float = 1e-4):
        if method not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {method!r}")
        self.closure, self.params, self.method, self.fd_eps = closure, list(params), method, fd_eps
        self.n_hvp = 0
        self.n_grad = 1
        self.unused: List[int] = []  # indices of the params the loss does not reach (see gradients)
        loss = evaluate_closure(closure)
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
            live = [(g, vi) for g, vi in zip(self._g_graph, v) if g.requires_grad]
            if not live:
                return [torch.zeros_like(p) for p in self.params]
            hv = torch.autograd.grad([g for g, _ in live], self.params, [vi for _, vi in live],
                                     retain_graph=True, allow_unused=True)
            return distributed.all_reduce_mean(
                [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(self.params, hv)])
        return finite_difference_hvp(self.closure, self.params, v, self.grads, self.fd_eps)

    def release(self) -> None:
        self._g_graph = None


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
