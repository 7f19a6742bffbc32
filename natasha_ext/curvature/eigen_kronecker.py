"""Eigenvalue-corrected Kronecker curvature (EKFAC): K-FAC's factors give the basis, the data
give the scale (George, Laurent, Bouthillier, Ballas & Vincent, "Fast Approximate Natural Gradient
Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018, Sec. 3 and Algorithm 1).

For a layer with gradient matrix T = [dW | db] (out x in[+1]) and K-FAC factors A, G (the EMAs of
:class:`~natasha_ext.curvature.kronecker.DenseKronecker`), the Kronecker-factored eigenbasis
(KFE) is U_A, U_G with A = U_A diag(sigma_A) U_A^T, G = U_G diag(sigma_G) U_G^T. K-FAC is the
block U diag(sigma_G (x) sigma_A) U^T in that basis; EKFAC keeps the basis and replaces the
diagonal by the second moment of the per-example gradients projected onto it,

    s*[i, j] = E_n[ (U_G^T dW_n U_A)[i, j]^2 ],

the diagonal that minimises the Frobenius distance to the Fisher among all matrices with that
eigenbasis (George et al., Sec. 3.2). The preconditioned gradient (Algorithm 1) is

    U = U_G [ (U_G^T T U_A) / (s* + gamma) ] U_A^T        (= (F_EKFAC + gamma I)^-1 vec T),

two GEMMs into the basis, an elementwise rescaling, two GEMMs back; gamma is Tikhonov damping of
the whole block (EKFAC damps the eigenvalues, not the factors).

Schedule (as the authors' reference implementation): the basis is recomputed from A and G every
``inv_every`` optimizer steps (and when a layer gets its first statistics); each refresh resets
s* to sigma_G (x) sigma_A, K-FAC's eigenvalues in the new basis (a diagonal in the old basis means
nothing in the new one), and every statistics step (``cov_every``) folds the minibatch's
per-example estimate into s* as an EMA with ``stat_decay``.

Per-example gradients (the paper's form, not the minibatch approximation): for an example whose
layer saw inputs a_l and output gradients g_l at L positions (L = 1 for a Linear layer on
vectors), dW_n = c sum_l g_l a_l^T with c the per-example factor of G (B for a batch-mean loss,
1 for a sum). Rotating the rows first, ~a = U_A^T a, ~g = U_G^T g, gives
U_G^T dW_n U_A = c sum_l ~g_l ~a_l^T, so for L = 1

    s*_batch = (c^2 / B) (~g o ~g)^T (~a o ~a)     (one GEMM of the squared rotated rows),

and for L > 1 (convolutions, sequences) the rotated per-example gradients are formed in chunks
of examples. A module called several times per step contributes each call's examples, as its
factors do.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from natasha_ext.curvature.kfac_factors import FactorCollector, KFACLayer
from natasha_ext.curvature.kronecker import DenseKronecker
from natasha_ext.precision import accumulation_dtype

__all__ = ["EigenKronecker", "eigenbasis", "projected_second_moment", "eigen_precondition"]

#: elements of one chunk of rotated per-example gradients (L > 1): bounds the extra memory
_CHUNK_ELEMENTS = 1 << 22


def eigenbasis(mats: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(eigenvalues clamped at 0, eigenvectors) of each symmetric factor; same-size factors are
    decomposed in one batched eigh."""
    out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(mats)
    by_size: Dict[tuple, List[int]] = {}
    for j, m in enumerate(mats):
        by_size.setdefault((m.shape[0], m.dtype, m.device), []).append(j)
    for idx in by_size.values():
        stack = torch.stack([mats[j] for j in idx])
        evals, evecs = torch.linalg.eigh(0.5 * (stack + stack.mT))
        for k, j in enumerate(idx):
            out[j] = (evals[k].clamp_min(0), evecs[k].contiguous())
    return out


def projected_second_moment(calls: Sequence[Tuple[torch.Tensor, torch.Tensor]], ua: torch.Tensor,
                            ug: torch.Tensor, batch_averaged: bool) -> torch.Tensor:
    """E_n[(U_G^T dW_n U_A)^2] over the N examples n of ``calls`` ([B, L, in] input rows and
    [B, L, out] output-gradient rows per call), an (out, in) tensor; dW_n = c sum_l g a^T with
    c = N when the loss was a batch mean (``batch_averaged``), else 1 (G's convention)."""
    total = ug.new_zeros(ug.shape[0], ua.shape[0])
    n = 0
    for a, g in calls:
        at, gt = a.to(ua.dtype) @ ua, g.to(ug.dtype) @ ug  # rows in the eigenbasis
        n += a.shape[0]
        if a.shape[1] == 1:  # one position: the rotated gradient is the outer product ~g ~a^T
            total.addmm_(gt[:, 0].square().t(), at[:, 0].square())
            continue
        chunk = max(1, _CHUNK_ELEMENTS // (total.numel() or 1))
        for lo in range(0, a.shape[0], chunk):
            pe = torch.einsum("blo,bli->boi", gt[lo:lo + chunk], at[lo:lo + chunk])
            total.add_(pe.square().sum(0))
    n = max(n, 1)
    return total.mul_(n if batch_averaged else 1.0 / n)  # c^2 / N


def eigen_precondition(grads: Sequence[torch.Tensor], ug: Sequence[torch.Tensor], ua: Sequence[torch.Tensor],
                       scales: Sequence[torch.Tensor], damping: Sequence[float]):
    """U_i = U_G [(U_G^T T_i U_A) / (s*_i + gamma_i)] U_A^T for every layer (the specification;
    plain torch: two GEMMs each way and an elementwise division), in the eigenbasis' dtype,
    plus the [L, 3] reductions (<T, U>, ||U||^2, ||T||^2) of the K-FAC family. <T, U> is taken in
    the eigenbasis, sum (U_G^T T U_A)^2 / (s* + gamma), so it is >= 0 whatever the round-off."""
    outs, rows = [], []
    for t, g, a, s, gamma in zip(grads, ug, ua, scales, damping):
        tt = t.to(g.dtype)
        rot = g.t() @ tt @ a
        scaled = rot / (s + gamma)
        u = g @ scaled @ a.t()
        rows.append(torch.stack([(rot * scaled).sum(), u.square().sum(), tt.square().sum()]))
        outs.append(u.to(t.dtype))
    red = torch.stack(rows).to(accumulation_dtype(list(grads))) if rows else None
    return outs, red


class EigenKronecker(DenseKronecker):
    """DenseKronecker's EMA factors, their eigenbasis (refreshed every ``inv_every`` steps) and
    the eigenvalue correction s* (an EMA with ``stat_decay``, updated by :meth:`update_scale`
    on every statistics step). ``lams`` are the dampings gamma added to s*."""

    STATE = ("kfac_A", "kfac_G", "ekfac_UA", "ekfac_UG", "ekfac_scale")

    def __init__(self, stat_decay: float = 0.95, inv_every: int = 100):
        super().__init__(stat_decay, inv_every, inverse="eigh")

    @staticmethod
    def state_shapes(layer: KFACLayer) -> Dict[str, tuple]:
        a, g = layer.a_dim, layer.out_features
        return {"ekfac_UA": (a, a), "ekfac_UG": (g, g), "ekfac_scale": (g, a)}

    def refresh(self, states: List[dict], have: List[int], lams: List[float], step: int) -> bool:
        """Recompute the eigenbasis of the layers ``have`` when due at optimizer ``step`` (or when
        one is missing), resetting s* to K-FAC's eigenvalues sigma_G (x) sigma_A; True when it did."""
        if not have or (step % self.inv_every and all("ekfac_UA" in states[i] for i in have)):
            return False
        decomposed = eigenbasis([m for i in have for m in (states[i]["kfac_A"], states[i]["kfac_G"])])
        for k, i in enumerate(have):
            (sa, ua), (sg, ug) = decomposed[2 * k], decomposed[2 * k + 1]
            states[i]["ekfac_UA"], states[i]["ekfac_UG"] = ua, ug
            states[i]["ekfac_scale"] = torch.outer(sg, sa)
        return True

    def update_scale(self, layers: List[KFACLayer], states: List[dict], collector: FactorCollector,
                     ready: List[int]) -> List[torch.Tensor]:
        """Fold the captured examples of every layer in ``ready`` (which have a basis) into s*;
        returns the updated s* tensors."""
        out = []
        for i in ready:
            st = states[i]
            s = projected_second_moment(collector.example_rows(i), st["ekfac_UA"], st["ekfac_UG"],
                                        collector.batch_averaged)
            st["ekfac_scale"].mul_(self.stat_decay).add_(s, alpha=1.0 - self.stat_decay)
            out.append(st["ekfac_scale"])
        return out

    @staticmethod
    def precondition(ts: List[torch.Tensor], states: List[dict], lams: List[float], fused: Optional[bool]):
        """(U list, [L, 3] reductions) with the stored basis and s* (``lams``: gamma per layer).
        Pure torch: the rotations are GEMMs and the rescaling one elementwise division, so there
        is no kernel for ``fused`` to select."""
        return eigen_precondition(ts, [st["ekfac_UG"] for st in states], [st["ekfac_UA"] for st in states],
                                  [st["ekfac_scale"] for st in states], lams)
