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
eigenbasis (George et al., Sec. 3.2). Where a factor is rank-deficient (fewer examples than
inputs so far, dead units) its null-space eigenvectors are arbitrary and s* per direction would
depend on them; s* is averaged over each null space there (:func:`pool_null_spaces`), which
makes EKFAC independent of that choice and changes nothing on a nondegenerate spectrum. The preconditioned gradient (Algorithm 1) is

    U = U_G [ (U_G^T T U_A) / (s* + gamma) ] U_A^T        (= (F_EKFAC + gamma I)^-1 vec T),

two GEMMs into the basis, an elementwise rescaling, two GEMMs back; gamma is Tikhonov damping of
the whole block (EKFAC damps the eigenvalues, not the factors).

Schedule (as the authors' reference implementation): the basis is recomputed from A and G every
``inv_every`` optimizer steps; each refresh resets s* to sigma_G (x) sigma_A, K-FAC's eigenvalues
in the new basis (a diagonal in the old basis means nothing in the new one), and every statistics
step (``cov_every``) folds the minibatch's per-example estimate into s* as an EMA with
``stat_decay``. The scheduled refresh runs before the step's statistics, from the factors so far
(identical on every rank), so that the step's s* is estimated in the new basis and joins the
factors in the one all-reduce of a statistics step. A layer gets its first basis right after its
first statistics; s* is then K-FAC's eigenvalues until its next statistics step corrects it.

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
from natasha_ext.curvature.kronecker import DenseKronecker, symmetric_eigh
from natasha_ext.precision import accumulation_dtype

__all__ = ["EigenKronecker", "eigenbasis", "projected_second_moment", "pool_null_spaces", "eigen_precondition"]

#: elements of one chunk of rotated per-example gradients (L > 1): bounds the extra memory
_CHUNK_ELEMENTS = 1 << 22


def eigenbasis(mats: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(eigenvalues, eigenvectors) of each symmetric PSD factor, eigenvalues ascending and set to
    exactly 0 where they are round-off (<= n eps lambda_max: the factor's null space); same-size
    factors are decomposed in one batched eigh."""
    out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(mats)
    by_size: Dict[tuple, List[int]] = {}
    for j, m in enumerate(mats):
        by_size.setdefault((m.shape[0], m.dtype, m.device), []).append(j)
    for idx in by_size.values():
        stack = torch.stack([mats[j] for j in idx])
        evals, evecs = symmetric_eigh(0.5 * (stack + stack.mT))
        tol = torch.finfo(evals.dtype).eps * evals.shape[-1] * evals[:, -1:].clamp_min(0)
        evals = torch.where(evals <= tol, torch.zeros_like(evals), evals)
        for k, j in enumerate(idx):
            out[j] = (evals[k], evecs[k].contiguous())
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


def pool_null_spaces(s: torch.Tensor, eig_g: torch.Tensor, eig_a: torch.Tensor) -> torch.Tensor:
    """In place: s[i, j] over the null space of A (eig_a == 0) replaced by its mean there, for every
    row i, then likewise over the null space of G for every column. Inside a null space the
    eigenvectors are whatever eigh returns, and s* per direction would depend on that choice; the
    mean over the space does not (sum_j (u^T dW n_j)^2 is the same for every orthonormal basis n_j
    of it), nor does the operator U diag(s*) U^T with s* constant there. No host sync."""
    null_a, null_g = (eig_a == 0).to(s.dtype), (eig_g == 0).to(s.dtype)
    row_mean = s @ (null_a / null_a.sum().clamp_min(1))
    s.copy_(torch.where(null_a.bool(), row_mean[:, None], s))
    col_mean = (null_g / null_g.sum().clamp_min(1)) @ s
    return s.copy_(torch.where(null_g.bool()[:, None], col_mean[None, :], s))


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

    STATE = ("kfac_A", "kfac_G", "ekfac_UA", "ekfac_UG", "ekfac_eigA", "ekfac_eigG", "ekfac_scale")

    def __init__(self, stat_decay: float = 0.95, inv_every: int = 100):
        super().__init__(stat_decay, inv_every, inverse="eigh")

    @staticmethod
    def state_shapes(layer: KFACLayer) -> Dict[str, tuple]:
        """The shapes of the eigenbasis state of ``layer`` (checked by load_state_dict)."""
        a, g = layer.a_dim, layer.out_features
        return {"ekfac_UA": (a, a), "ekfac_UG": (g, g), "ekfac_eigA": (a,), "ekfac_eigG": (g,), "ekfac_scale": (g, a)}

    @staticmethod
    def _rebase(states: List[dict], idx: List[int]) -> bool:
        """Eigenbasis of the factors of the layers ``idx``, and s* reset to K-FAC's eigenvalues
        sigma_G (x) sigma_A in it; True when there was a layer."""
        decomposed = eigenbasis([m for i in idx for m in (states[i]["kfac_A"], states[i]["kfac_G"])])
        for k, i in enumerate(idx):
            (sa, ua), (sg, ug) = decomposed[2 * k], decomposed[2 * k + 1]
            states[i]["ekfac_UA"], states[i]["ekfac_UG"] = ua, ug
            states[i]["ekfac_eigA"], states[i]["ekfac_eigG"] = sa, sg
            states[i]["ekfac_scale"] = torch.outer(sg, sa)
        return bool(idx)

    def scheduled_refresh(self, states: List[dict], step: int) -> bool:
        """Before the statistics of optimizer ``step``: every ``inv_every`` steps, the layers that
        have a basis get a new one from their factors as they stand (the same on every rank), so
        that this step's s* joins the factors in one all-reduce. True when it refreshed."""
        return not step % self.inv_every and self._rebase(states, [i for i, st in enumerate(states)
                                                                   if "ekfac_UA" in st])

    def refresh(self, states: List[dict], have: List[int], lams: List[float], step: int) -> bool:
        """After the statistics: a basis for the layers of ``have`` that got their first factors
        (s* = sigma_G (x) sigma_A until the next statistics step corrects it)."""
        return self._rebase(states, [i for i in have if "ekfac_UA" not in states[i]])

    def update(self, layers: List[KFACLayer], states: List[dict], collector: FactorCollector, ready: List[int],
               fused: Optional[bool]) -> List[torch.Tensor]:
        """DenseKronecker's factor EMAs, then s* <- stat_decay s* + (1 - stat_decay) s*_batch for the
        layers of ``ready`` that have a basis; returns the factors and s* (one all-reduce)."""
        out = super().update(layers, states, collector, ready, fused)
        for i in ready:
            st = states[i]
            if "ekfac_UA" not in st:
                continue
            s = projected_second_moment(collector.example_rows(i), st["ekfac_UA"], st["ekfac_UG"],
                                        collector.batch_averaged)
            pool_null_spaces(s, st["ekfac_eigG"], st["ekfac_eigA"])
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
