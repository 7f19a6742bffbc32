"""K-FAC's KL clipping: the factor nu that bounds the (quadratic model of the) KL divergence a
natural-gradient step lr * nu * U can cause, lr^2 nu^2 t^T F^-1 t <= kl_clip (Ba, Grosse &
Martens, "Distributed second-order optimization using Kronecker-factored approximations", 2017):

    nu = min(1, sqrt(kl_clip / sum_l lr_l^2 t_l^T F_l^-1 t_l)),

with t_l^T F_l^-1 t_l = <T_l, U_l> the first column of the [L, 3] reductions that
:func:`natasha_ext.ops.kfac_precondition` / :func:`natasha_ext.ops.kfac_smw_apply` return. One
function for the KFAC/ANG/IFANG optimizers and :class:`natasha_ext.optim.KFACPreconditioner`.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["kl_clip_scale"]


def kl_clip_scale(reductions: torch.Tensor, lrs: Sequence[float], kl_clip: float) -> torch.Tensor:
    """nu as a 0-dim tensor on the reductions' device (1 when the sum is not positive or not
    finite); ``lrs``: the learning rate of each layer (row of ``reductions``)."""
    if all(lr == lrs[0] for lr in lrs):  # one lr (the usual case): no host-to-device copy
        vg = reductions[:, 0].sum() * lrs[0] ** 2
    else:
        lr2 = torch.tensor([lr ** 2 for lr in lrs], dtype=reductions.dtype).to(reductions.device, non_blocking=True)
        vg = (reductions[:, 0] * lr2).sum()
    nu = torch.sqrt(kl_clip / vg.clamp_min(torch.finfo(reductions.dtype).tiny)).clamp(max=1.0)
    return torch.where(torch.isfinite(vg) & (vg > 0), nu, torch.ones_like(nu))
