"""The layers K-FAC preconditions and how their statistics are read (the math of
:mod:`natasha_ext.curvature.kfac_factors`' hooks, which do the plumbing).

Each supported module has a *structure*, the form of its Fisher block:

============  =================================================  ========================================
structure     modules                                            Fisher block
============  =================================================  ========================================
kronecker     ``nn.Linear``; ``nn.Conv1d/2d/3d`` with groups=1    A (x) G, A over the (unfolded) inputs with
              (any stride, dilation, numeric or 'same'/'valid'   a bias column, G over the output
              padding, every padding mode)                       gradients (Martens & Grosse 2015; the KFC
                                                                 "expand" form of Grosse & Martens 2016)
grouped       ``nn.Conv1d/2d/3d`` with groups > 1 (grouped,      one A_g (x) G_g per group (block-diagonal
              depthwise)                                         over the groups)
diag_a        ``nn.Embedding`` (dense gradients)                 A (x) G with A = diag(token frequencies):
                                                                 the exact K-FAC A of one-hot inputs
elementwise   ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,  the diagonal of the Fisher of the affine
              ``nn.BatchNorm1d/2d/3d`` (affine parameters)       weight and bias (elementwise), from exact
                                                                 per-example gradients
============  =================================================  ========================================

Convolutions: the input is padded as the module pads it (``_reversed_padding_repeated_twice``,
which holds the asymmetric split of ``padding='same'``, with the module's ``padding_mode``) and
cut into patches with ``Tensor.unfold`` per spatial dimension, laid out as ``F.unfold`` lays them
out (channel, then kernel offsets; positions row-major), i.e. in the order of the flattened
weight ``(out, in/groups * prod(kernel))``.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["STRUCTURES", "layer_structure", "conv_patches", "normalized_input", "example_affine_grads",
           "check_skip_layers", "is_skipped"]

STRUCTURES = ("kronecker", "grouped", "diag_a", "elementwise")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def layer_structure(module: nn.Module) -> Tuple[Optional[str], str]:
    """(structure, '') for a module K-FAC preconditions, (None, why) otherwise."""
    if isinstance(module, nn.Linear):
        return "kronecker", ""
    if isinstance(module, _CONVS):
        return ("grouped" if module.groups > 1 else "kronecker"), ""
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "Embedding(sparse=True): sparse gradients"
        if module.scale_grad_by_freq:
            return None, "Embedding(scale_grad_by_freq=True): the gradient is not a Kronecker product"
        return "diag_a", ""
    if isinstance(module, _NORMS):
        return "elementwise", ""
    return None, f"{type(module).__name__}: no K-FAC block for this module type"


def layer_kind(module: nn.Module) -> str:
    """A short name of the module's layer type ('linear', 'conv2d', 'embedding', 'layernorm', ...)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return f"conv{module.weight.dim() - 2}d"
    return type(module).__name__.lower()


def conv_patches(x: torch.Tensor, m: nn.Module) -> torch.Tensor:
    """The (B, C*prod(k), L) patches of conv ``m``'s input ``x`` (batched or not), as F.unfold
    lays them out for 2-D: the rows of the conv as a matrix product W (out, C/groups*k) @ patches
    (per group: channel block g of the patches)."""
    n = m.weight.dim() - 2
    if x.dim() == n + 1:
        x = x.unsqueeze(0)
    pad = list(m._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    for d in range(n):
        k, s, dil = m.kernel_size[d], m.stride[d], m.dilation[d]
        x = x.unfold(2 + d, dil * (k - 1) + 1, s)  # appends the window as the last dimension
        if dil > 1:
            x = x[..., ::dil]
    # (B, C, O_1..O_n, k_1..k_n) -> (B, C, k_1..k_n, O_1..O_n) -> (B, C*K, L)
    b, c = x.shape[:2]
    perm = [0, 1] + list(range(2 + n, 2 + 2 * n)) + list(range(2, 2 + n))
    return x.permute(perm).reshape(b, c * math.prod(m.kernel_size), -1).contiguous()


def normalized_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x_hat, the normalized input a norm layer scales by its weight and shifts by its bias
    (y = weight * x_hat + bias). BatchNorm uses the batch statistics in training mode (or without
    running statistics) and the running ones otherwise, as its forward does; the running
    statistics are not touched."""
    if isinstance(m, nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    if isinstance(m, nn.RMSNorm):
        return F.rms_norm(x, m.normalized_shape, None, m.eps)
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, None, None, m.eps)
    batch_stats = m.training or m.running_mean is None
    mean = None if batch_stats else m.running_mean.to(x.dtype)
    var = None if batch_stats else m.running_var.to(x.dtype)
    return F.batch_norm(x, mean, var, None, None, batch_stats, 0.0, m.eps)


def example_affine_grads(m: nn.Module, x_hat: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """(B, n, 1 or 2): per example, the gradient of a norm layer's weight (column 0) and bias
    (column 1), flattened, given the output gradient ``g`` of that example: sum over the positions
    the affine map is shared by of g * x_hat and of g."""
    p = m.weight
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        batched = x_hat.dim() > p.dim()
        shape = (x_hat.shape[0] if batched else 1, -1, p.numel())
    else:  # (B, C, ...): channels on dim 1 (BatchNorm, GroupNorm)
        shape = (x_hat.shape[0], p.numel(), -1)
    gw = (g * x_hat).reshape(shape)
    red = 1 if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) else 2
    cols = [gw.sum(red)]
    if bias:
        cols.append(g.reshape(shape).sum(red))
    return torch.stack(cols, -1)


def check_skip_layers(skip) -> tuple:
    """``skip_layers`` as a tuple of names (full match, or regular expressions), compiled patterns
    and module types; raises TypeError naming the argument otherwise."""
    if skip is None:
        return ()
    if isinstance(skip, (str, type, re.Pattern)):
        skip = [skip]
    try:
        items = tuple(skip)
    except TypeError:
        raise TypeError(f"skip_layers must be module names / regular expressions, compiled patterns or module "
                        f"types (or an iterable of them), got {type(skip).__name__}") from None
    for s in items:
        if isinstance(s, str):
            try:
                re.compile(s)
            except re.error as exc:
                raise ValueError(f"skip_layers: {s!r} is not a valid regular expression ({exc})") from None
        elif not (isinstance(s, re.Pattern) or (isinstance(s, type) and issubclass(s, nn.Module))):
            raise TypeError(f"skip_layers entries must be str, re.Pattern or nn.Module subclasses, got {s!r}")
    return items


def is_skipped(name: str, module: nn.Module, skip: tuple) -> bool:
    """True when ``module`` (called ``name`` in the model) matches an entry of ``skip``: its type,
    or its name (equal, or a full match of the pattern)."""
    for s in skip:
        if isinstance(s, type):
            if isinstance(module, s):
                return True
        elif isinstance(s, re.Pattern):
            if s.fullmatch(name):
                return True
        elif s == name or re.fullmatch(s, name):
            return True
    return False
