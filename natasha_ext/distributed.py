"""Multi-process training: the collectives the optimizers need, applied centrally.

DDP averages ``.grad`` inside ``backward()`` and does not support double backward, so the
second-order optimizers of this package do their own reduction. Every rank evaluates the closure
on its own shard of the batch; while an optimizer with a process group runs ``step()``:

* every loss the closure returns is replaced by its average over the ranks (the *value*; its
  gradient stays the local one, which is then averaged below), so decisions taken on loss values
  (trust-region acceptance, kicks) are identical on every rank;
* every gradient and Hessian-vector product the shared engines in
  :mod:`natasha_ext.curvature.hvp` produce is averaged, one flat bucket (per dtype) per
  collective;
* random probes (Rademacher z, Oja's start vector, kick signs) come from the optimizer's Philox
  stream, whose (seed, offset) is broadcast from the group's first rank when the group is
  attached, so every rank draws the same z;
* family-specific statistics (K-FAC factors) go through :meth:`NatashaOptimizer.reduce_mean`.

With equal shard sizes and a mean-reduced loss, the average of the ranks' gradients (HVPs) is the
gradient (HVP) of the full batch, so N ranks reproduce one process on the concatenated batch up to
floating-point summation order. Shards of unequal size need the loss weighted by
``shard_size * world_size / total`` (the average is unweighted).

Usage (same code with ``backend="nccl"`` on GPUs)::

    dist.init_process_group("gloo")
    opt = natasha_ext.optim.AdaHessian(model.parameters(), lr=0.1)
    natasha_ext.distributed.attach(opt)            # WORLD group; broadcasts the Philox seed
    natasha_ext.distributed.broadcast_parameters(model.parameters())
    for xb, yb in loader_of_this_rank:
        opt.step(lambda: loss_fn(model(xb), yb))   # no backward, no DDP wrapper
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, List, Optional, Sequence

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("natasha_ext_process_group", default=None)

#: sentinel: "the default (WORLD) group"
WORLD = "WORLD"


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")
    return dist


def _resolve(group):
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return dist.group.WORLD if group is None or group is WORLD else group


def world_size(group=None) -> int:
    dist = _dist()
    return dist.get_world_size(_resolve(group))


def active_group():
    """The process group of the optimizer step that is running, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using_group(group):
    """Make ``group`` the active group: the engines average across it while inside."""
    token = _ACTIVE.set(group)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def all_reduce_mean(tensors: Sequence[torch.Tensor], group=None) -> List[torch.Tensor]:
    """Average ``tensors`` across ``group`` (default: the active group; no-op without one).

    One collective per dtype: the tensors are flattened into one bucket, reduced (SUM, then
    divided by the world size) and returned as views of that bucket with the inputs' shapes; the
    inputs are left untouched (they may be part of an autograd graph)."""
    group = active_group() if group is None else group
    tensors = list(tensors)
    if group is None or not tensors:
        return tensors
    dist = _dist()
    group = _resolve(group)
    n = dist.get_world_size(group)
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    by_dtype = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), idx in by_dtype.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
        if n > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(n)
        pos = 0
        for i in idx:
            k = tensors[i].numel()
            out[i] = flat[pos:pos + k].view(tensors[i].shape)
            pos += k
    return out  # type: ignore[return-value]


class _GlobalValue(torch.autograd.Function):
    """Value of ``global_value``, gradient of ``local`` (identity): used so that a rank's loss
    reports the average over ranks while its gradient stays the rank's own (averaged later)."""

    @staticmethod
    def forward(ctx, local, global_value):
        return global_value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, local_tangent, global_tangent):
        return local_tangent  # forward mode (hvp='forward_over_reverse') sees the same identity


def global_loss(loss, group=None):
    """The average of ``loss`` over the ranks (the value; the gradient stays local).
    Returns ``loss`` unchanged without an active group or for non-tensors."""
    group = active_group() if group is None else group
    if group is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        return loss
    (avg,) = all_reduce_mean([loss.detach().reshape(())], group)
    avg = avg.reshape(loss.shape)
    if loss.requires_grad:
        return _GlobalValue.apply(loss, avg)
    return avg


def wrap_closure(closure, group):
    """A closure whose returned loss is averaged across ``group`` (see :func:`global_loss`)."""
    if closure is None or group is None:
        return closure

    def reduced_closure():
        out = closure()
        if isinstance(out, tuple) and out:  # (loss, outputs) closures: only the loss is averaged
            return (global_loss(out[0], group),) + out[1:]
        return global_loss(out, group)

    reduced_closure.__wrapped__ = closure
    return reduced_closure


def broadcast_rng(rng, group=None) -> None:
    """Give every rank the Philox (seed, offset) of the group's first rank."""
    dist = _dist()
    group = _resolve(group)
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    buf = torch.tensor([rng.seed, rng.offset], dtype=torch.int64)
    dist.broadcast(buf, src=src, group=group)
    rng.seed, rng.offset = int(buf[0]), int(buf[1])


def broadcast_parameters(params: Iterable[torch.Tensor], group=None) -> None:
    """Copy the group's first rank's parameters to every rank (one bucket per dtype)."""
    dist = _dist()
    group = _resolve(group)
    src = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    params = list(params)
    by_dtype = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    with torch.no_grad():
        for ps in by_dtype.values():
            flat = torch.cat([p.detach().reshape(-1) for p in ps])
            dist.broadcast(flat, src=src, group=group)
            pos = 0
            for p in ps:
                p.copy_(flat[pos:pos + p.numel()].view(p.shape))
                pos += p.numel()


def attach(optimizer, group=None):
    """Attach ``optimizer`` (a :class:`~natasha_ext.optim.NatashaOptimizer`) to ``group``
    (default: WORLD). Returns the optimizer."""
    optimizer.set_process_group(WORLD if group is None else group)
    return optimizer
