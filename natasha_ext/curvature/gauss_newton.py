"""Generalised Gauss-Newton products G v = J^T H_l J v (Schraudolph 2002), the positive
semi-definite alternative to the Hessian in regularised Newton methods (
"Adaptive norms for deep learning with regularized Newton methods" (anonymous, under double-blind review, 2019), Sec. 2).

Closure convention for ``curvature='gauss_newton'``: ``closure()`` returns ``(loss, outputs)``
where ``outputs`` is the network output tensor and ``loss`` a convex function of it (cross
entropy, MSE), both on the current minibatch and without calling backward. The Gauss-Newton
matrix is exact for the last layer's nonlinearity folded into the loss; it is PSD whenever l is
convex in the outputs, so a TR/ARC model built on it never has negative curvature.

Per product: J v by the double-vjp trick (d/dw [J^T w]·v, one backward through the backward
graph), H_l (J v) by double backward through the loss alone (cheap), and J^T(.) one backward.
Counted as 2 backpropagations.

Like the shared HVP engines (:mod:`natasha_ext.curvature.hvp`): inside ``loss_scale(S)`` the
oracle differentiates ``S * loss`` and divides the gradient and every product by ``S`` (fp16
overflow shows up as inf/NaN, which the optimizers skip), and while an optimizer with a process
group runs ``step()`` the gradient and every product are averaged across the ranks (one bucket
each): G is linear in the per-example terms of a mean-reduced loss, so the average of the
ranks' shard products is the full-batch product.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from natasha_ext import distributed
from natasha_ext.curvature import hvp as _hvp


def split_closure_output(out, who: str = "closure") -> Tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(x, torch.Tensor) for x in out)):
        raise TypeError(f"with curvature='gauss_newton' the {who} must return (loss, outputs): the scalar loss and "
                        f"the model output tensor it is computed from; got {type(out).__name__}")
    loss, outputs = out
    if loss.numel() != 1:
        raise ValueError(f"{who} must return a scalar loss, got shape {tuple(loss.shape)}")
    if loss.grad_fn is None or outputs.grad_fn is None:
        raise ValueError(f"{who}: loss and outputs must depend on the parameters through autograd")
    return loss.reshape(()), outputs


class GaussNewton:
    """Gradient at the current point plus a Gauss-Newton-vector-product oracle (same interface
    as :class:`natasha_ext.curvature.HVP`)."""

    def __init__(self, closure: Callable[[], Tuple[torch.Tensor, torch.Tensor]], params: Sequence[torch.Tensor]):
        self.params = list(params)
        self.n_hvp, self.n_grad = 0, 1
        self._scale = _hvp._LOSS_SCALE.get()
        with torch.enable_grad():
            out = _hvp.closure_output(closure, "curvature='gauss_newton' (use 'hessian' with such a closure)")
            loss, out = split_closure_output(out)
            self._out = out
            scaled = loss if self._scale is None else loss * self._scale
            # dl/dout of the (scaled) loss; H_l J v below is taken through it, then unscaled
            self._dl_dout = torch.autograd.grad(scaled, out, create_graph=True)[0]
            grads = [g.detach() for g in _vjp(out, self.params, self._dl_dout.detach())]
            self._w = torch.zeros_like(out, requires_grad=True)
            self._jtw = _vjp(out, self.params, self._w, create_graph=True)
        self.grads = distributed.all_reduce_mean(self._unscale(grads))
        self.loss = loss.detach()

    def _unscale(self, ts: List[torch.Tensor]) -> List[torch.Tensor]:
        return ts if self._scale is None else [t / self._scale for t in ts]

    def __call__(self, v: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if self._out is None:
            raise RuntimeError("Gauss-Newton oracle used after release()")
        self.n_hvp += 1
        with torch.enable_grad():
            live = [(j, vi) for j, vi in zip(self._jtw, v) if j.requires_grad]
            if not live:
                return distributed.all_reduce_mean([torch.zeros_like(p) for p in self.params])
            jv = torch.autograd.grad([j for j, _ in live], self._w, [vi.to(j.dtype) for j, vi in live],
                                     retain_graph=True)[0]
            if self._dl_dout.requires_grad:
                hjv = torch.autograd.grad(self._dl_dout, self._out, jv, retain_graph=True)[0]
            else:  # loss linear in the outputs
                hjv = torch.zeros_like(jv)
            gv = [g.detach() for g in _vjp(self._out, self.params, hjv)]
        return distributed.all_reduce_mean(self._unscale(gv))

    def release(self) -> None:
        self._out = self._dl_dout = self._jtw = self._w = None


def _vjp(out: torch.Tensor, params: List[torch.Tensor], w: torch.Tensor, create_graph: bool = False):
    gs = torch.autograd.grad(out, params, w, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
