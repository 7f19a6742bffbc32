"""EKFAC: K-FAC in its Kronecker-factored eigenbasis with the eigenvalues corrected from
per-example gradients (George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018, Algorithm 1). A member of the
K-FAC family of :mod:`natasha_ext.optim.kfac` (same hooks, layers, KL clipping, momentum, state
and distributed rules); its curvature is
:class:`natasha_ext.curvature.eigen_kronecker.EigenKronecker`.
"""
from __future__ import annotations

from typing import List, Optional

import torch.nn as nn

from natasha_ext.curvature.eigen_kronecker import EigenKronecker
from natasha_ext.optim import _validation as V
from natasha_ext.optim._base import shared_args_doc
from natasha_ext.optim.kfac import _KroneckerFamily

__all__ = ["EKFAC"]


@shared_args_doc
class EKFAC(_KroneckerFamily):
    """Eigenvalue-corrected K-FAC (George et al. 2018, Algorithm 1). Per layer (gradient matrix
    T = [dW | db], K-FAC factors A = U_A diag(sigma_A) U_A^T, G = U_G diag(sigma_G) U_G^T of the
    empirical Fisher, as :class:`KFAC` collects them):

        s*  <- stat_decay s* + (1 - stat_decay) E_n[(U_G^T dW_n U_A)^2]    (every statistics step,
                                                                          per-example dW_n)
        U    = U_G [ (U_G^T T U_A) / (s* + damping) ] U_A^T              (= (F_EKFAC + damping I)^-1 T)

    then K-FAC's KL clipping nu = min(1, sqrt(kl_clip / sum_l lr^2 <U_l, T_l>)) and heavy-ball
    momentum, buf <- momentum buf + nu U; p <- p - lr buf. The eigenbasis U_A, U_G is recomputed
    from the factors' EMAs every ``inv_every`` steps (before that step's statistics), which resets
    s* to sigma_G (x) sigma_A (K-FAC's eigenvalues: with that s* and no damping EKFAC is K-FAC);
    the per-example second moments then correct it. A layer's first step with statistics builds
    its first basis and, with s* = sigma_G (x) sigma_A, is K-FAC with Tikhonov damping. In the null
    space of a rank-deficient factor (directions no example has shown yet), whose eigenvectors
    eigh picks arbitrarily, s* is averaged over the space, so the step does not depend on that
    choice. Parameters of layers that cannot be preconditioned take
    SGD-momentum, as in :class:`KFAC` (``opt.fallback_names``). The projections are four GEMMs
    and the rescaling one elementwise division per layer, in plain torch: no fused kernel; the
    factor EMAs use the ``fused`` K-FAC op as in :class:`KFAC`. ``opt.counters['inverse_updates']``
    counts the eigenbasis refreshes, ``'factor_updates'`` the statistics steps (factors and s*).

    Args:
        model_or_params: nn.Module, or params / param groups together with ``model=``.
        lr (0.01), momentum (0.9), damping (1e-3: gamma added to the corrected eigenvalues s*,
        Tikhonov damping of the whole block, not per factor as in :class:`KFAC`),
        stat_decay (0.95: EMA decay of the factors and of s*), weight_decay (0),
        kl_clip (1e-3; None or 0 disables), cov_every (1: s* and the factors are updated every
        step, as the paper's frequent rescaling), inv_every (100: steps between eigenbasis
        refreshes), batch_averaged (True), grad_scaler, model as :class:`KFAC`.
        {shared_args}

    Distributed (``process_group``): the factors and s* are averaged over the ranks after their
    EMA in one bucketed all-reduce per statistics step, so every rank holds the statistics of the
    global batch and computes the same eigenbasis.
    """

    ACCUMULATION_STATE = EigenKronecker.STATE + ("momentum_buffer",)

    def __init__(self, model_or_params, lr: float = 0.01, momentum: float = 0.9, damping: float = 1e-3,
                 stat_decay: float = 0.95, weight_decay: float = 0.0, kl_clip: Optional[float] = 1e-3,
                 cov_every: int = 1, inv_every: int = 100, *, model: Optional[nn.Module] = None,
                 batch_averaged: bool = True, grad_scaler=None, fused: Optional[bool] = None,
                 seed: Optional[int] = None, raise_on_nonfinite: bool = False, process_group=None):
        self._check_common(lr, momentum, damping, None, weight_decay, kl_clip, cov_every)
        V.in_range("stat_decay", stat_decay, 0.0, 1.0)
        V.positive_int("inv_every", inv_every)
        super().__init__(model_or_params, EigenKronecker(stat_decay, inv_every), lr=lr, momentum=momentum,
                         damping=damping, factor_damping=None, weight_decay=weight_decay, kl_clip=kl_clip,
                         cov_every=cov_every,
                         model=model, batch_averaged=batch_averaged, grad_scaler=grad_scaler, fused=fused,
                         seed=seed, raise_on_nonfinite=raise_on_nonfinite, process_group=process_group,
                         fisher="empirical")  # s* is built from the per-example training gradients

    def _factor_damping(self, i: int) -> float:
        """EKFAC damps the eigenvalues: gamma itself (layer i's group), added to s*."""
        return float(self.param_groups[self._layer_group[i]]["damping"])

    def _prepare(self, ready: List[int]) -> List[int]:
        """The scheduled eigenbasis refresh first (from the factors so far), then K-FAC's update of
        the statistics (factors and s*, one all-reduce) and a basis for layers new to them."""
        if self.curvature.scheduled_refresh(self._layer_states(), int(self.counters["steps"])):
            self.counters["inverse_updates"] += 1
        return super()._prepare(ready)

    def _state_shape(self, p, key: str):
        layer = {id(l.weight): l for l in getattr(self, "_layers", ())}.get(id(p)) if key.startswith("ekfac_") else None
        if layer is None:
            return super()._state_shape(p, key)
        return EigenKronecker.state_shapes(layer).get(key)
