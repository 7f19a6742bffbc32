"""K-FAC's KL clipping: the factor nu that bounds the (quadratic model of the) KL divergence a
step lr * nu * d can cause, lr^2 nu^2 d^T F d <= kl_clip (Ba, Grosse &
Martens, "Distributed second-order optimization using Kronecker-factored approximations", 2017):

    nu = min(1, sqrt(kl_clip / sum_l lr_l^2 d_l^T F_l d_l)),

where d_l^T F_l d_l is measured in the damped Kronecker block F_l of layer l; for the natural
gradient d = U = F^-1 t it is t^T F^-1 t = <T, U>, the first column of the [L, 3] reductions
that :func:`natasha_ext.ops.kfac_precondition` / :func:`natasha_ext.ops.kfac_smw_apply` return.
One function for the KFAC/ANG/IFANG optimizers and :class:`natasha_ext.optim.KFACPreconditioner`.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["kl_clip_scale"]


def kl_clip_scale(quad: torch.Tensor, lrs: Sequence[float], kl_clip: float) -> torch.Tensor:
    """nu as a 0-dim tensor on ``quad``'s device (1 when the sum is not positive or not finite);
    ``quad``: [L] d_l^T F_l d_l, ``lrs``: the learning rate of each layer."""
    if all(lr == lrs[0] for lr in lrs):  # one lr (the usual case): no host-to-device copy
        vg = quad.sum() * lrs[0] ** 2
    else:
        lr2 = torch.tensor([lr ** 2 for lr in lrs], dtype=quad.dtype).to(quad.device, non_blocking=True)
        vg = (quad * lr2).sum()
    nu = torch.sqrt(kl_clip / vg.clamp_min(torch.finfo(quad.dtype).tiny)).clamp(max=1.0)
    return torch.where(torch.isfinite(vg) & (vg > 0), nu, torch.ones_like(nu))
