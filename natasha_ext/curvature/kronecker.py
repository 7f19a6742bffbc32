"""Kronecker-factored curvature for K-FAC, ANG and IFANG: where the factors come from and how
a layer's gradient matrix T is preconditioned by them. Two strategies share one interface:

* :class:`DenseKronecker`: exponential moving averages of the factors A = E[a a^T] and
  G = E[g g^T] (Martens & Grosse, "Optimizing neural networks with Kronecker-factored
  approximate curvature", 2015, Sec. 5; Grosse & Martens, "A Kronecker-factored approximate
  Fisher matrix for convolution layers", 2016, for convolutions), refreshed into damped inverses
  (A + lam I)^-1, (G + lam I)^-1 by Cholesky (eigh where a factor is numerically indefinite) or
  eigh, then U = (G + lam I)^-1 T (A + lam I)^-1.
* :class:`LowRankKronecker`: rank-s' factors A ~ YA^T YA, G ~ YG^T YG from the current minibatch's
  s' row-group means, applied by Sherman-Morrison-Woodbury with only s' x s' systems (Tang, Jiang,
  Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a regularized natural gradient optimization
  algorithm with look-ahead strategy", 2021, Sec. 2.3, eqs. 9-13 and Algorithm 1).

The statistics are captured by :class:`natasha_ext.curvature.kfac_factors.FactorCollector`; a
strategy keeps its factors in each layer's optimizer state (``states[i]``, the state dict of the
layer's weight, key names in ``STATE``) so that they are checkpointed with it. ``lams[i]`` is the
per-factor damping lam of layer i, added to each factor as in Tang et al.'s eqs. 8-13 (the
optimizer derives it from its ``factor_damping`` or ``damping`` argument). The optimizer averages
the tensors :meth:`update` returns across its process group. :meth:`quadratic_form` measures
d^T F d of a step d in the damped Kronecker Fisher F = (A + lam I) (x) (G + lam I) of the current
factors (the KL clip of the step taken).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from natasha_ext import ops
from natasha_ext.curvature.kfac_factors import FactorCollector, KFACLayer
from natasha_ext.precision import accumulation_dtype

__all__ = ["DenseKronecker", "LowRankKronecker", "damped_inverses"]

INVERSES = ("cholesky", "eigh")


def symmetric_eigh(sym: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of symmetric matrices (a stack or one) that also converges where LAPACK's
    divide and conquer gives up in fp32 (ill-conditioned factors with clusters of equal
    eigenvalues: it did on ResNet-18's K-FAC factors): on a failure the decomposition is redone in
    fp64 and rounded back, then, if fp64 fails too, with a relative jitter of 1e-12 max|F| on the
    diagonal (far below any damping). Raises a LinAlgError naming the shape if that fails."""
    try:
        return torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        pass
    wide = sym.to(torch.float64)
    for jitter in (0.0, 1e-12):
        try:
            if jitter:
                scale = wide.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
                wide = wide + jitter * scale * torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
            evals, evecs = torch.linalg.eigh(wide)
            return evals.to(sym.dtype), evecs.to(sym.dtype)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError(f"eigh of a {tuple(sym.shape)} K-FAC factor did not converge in fp32 or fp64 "
                                   "(with a 1e-12 relative jitter): the factor holds non-finite or degenerate values")


def damped_inverses(mats: Sequence[torch.Tensor], lams: Sequence[float], method: str = "cholesky") -> List[torch.Tensor]:
    """(F + lam I)^-1 for each symmetric factor F; same-size factors are batched. 'cholesky' falls
    back to eigh (eigenvalues clamped at 0) for the factors that are numerically indefinite, found
    with one host sync over all of them; 'eigh' uses it for every factor."""
    out: List[Optional[torch.Tensor]] = [None] * len(mats)
    by_size: Dict[tuple, List[int]] = {}
    for j, m in enumerate(mats):
        by_size.setdefault((m.shape[0], m.dtype), []).append(j)
    pending_eigh, infos = [], []
    for (n, dt), idx in by_size.items():
        if method != "cholesky":
            pending_eigh += idx
            continue
        eye = torch.eye(n, dtype=dt, device=mats[idx[0]].device)
        L, info = torch.linalg.cholesky_ex(torch.stack([mats[j] + lams[j] * eye for j in idx]))
        # cholesky_inverse returns each matrix column-major; the inverse is symmetric, so its
        # transpose is the same matrix laid out row-major (contiguous) for free. A non-contiguous
        # inverse cost the fused kfac_precondition a transposing copy of every factor every step.
        inv = torch.cholesky_inverse(L).mT
        infos.append((idx, info))
        for k, j in enumerate(idx):
            out[j] = inv[k]
    if infos:
        bad = torch.cat([info for _, info in infos]) != 0
        if bool(bad.any()):
            flat = [j for idx, _ in infos for j in idx]
            pending_eigh += [flat[k] for k in torch.nonzero(bad).flatten().tolist()]
    for j in pending_eigh:
        m = mats[j]
        evals, evecs = symmetric_eigh(0.5 * (m + m.t()))
        out[j] = (evecs / (evals.clamp_min(0) + lams[j])) @ evecs.t()
    return out


def _damped_pair(gd: torch.Tensor, da: torch.Tensor, d: torch.Tensor, lam: float) -> torch.Tensor:
    """<G d + lam d, d A + lam d> = d^T ((A + lam I) (x) (G + lam I)) d from G d and d A."""
    return ((gd + lam * d) * (da + lam * d)).sum()


class DenseKronecker:
    """EMA factors (decay ``stat_decay``; a layer's first update starts its EMA) and their damped
    inverses, refreshed every ``inv_every`` optimizer steps ('cholesky' or 'eigh')."""

    STATE = ("kfac_A", "kfac_G", "kfac_A_inv", "kfac_G_inv")
    collector_mode = "full"
    rank = 1

    def __init__(self, stat_decay: float = 0.95, inv_every: int = 100, inverse: str = "cholesky"):
        if inverse not in INVERSES:
            raise ValueError(f"invalid inverse: {inverse!r} (must be one of {INVERSES})")
        self.stat_decay = float(stat_decay)
        self.inv_every = int(inv_every)
        self.inverse = inverse

    def update(self, layers: List[KFACLayer], states: List[dict], collector: FactorCollector, ready: List[int],
               fused: Optional[bool]) -> List[torch.Tensor]:
        """Fold layer i's captured rows into its factors for every i in ``ready``; returns them."""
        decay_of = {}
        fa, ra, sa, fg, rg, sg = [], [], [], [], [], []
        for i in ready:
            layer, st = layers[i], states[i]
            fresh = "kfac_A" not in st
            if fresh:
                dt, dev = accumulation_dtype(layer.weight), layer.weight.device
                st["kfac_A"] = torch.zeros(layer.a_dim, layer.a_dim, dtype=dt, device=dev)
                st["kfac_G"] = torch.zeros(layer.out_features, layer.out_features, dtype=dt, device=dev)
            decay_of[i] = 0.0 if fresh else self.stat_decay
            a, s_a = collector.a_rows(i)
            g, s_g = collector.g_rows(i)
            fa.append(st["kfac_A"]); ra.append(a); sa.append(s_a)
            fg.append(st["kfac_G"]); rg.append(g); sg.append(s_g)
        # one call per kind and decay
        for decay in sorted(set(decay_of.values())):
            sel = [j for j, i in enumerate(ready) if decay_of[i] == decay]
            ops.kfac_factor_ema_([fa[j] for j in sel], [ra[j] for j in sel], [sa[j] for j in sel], decay, fused=fused)
            ops.kfac_factor_ema_([fg[j] for j in sel], [rg[j] for j in sel], [sg[j] for j in sel], decay, fused=fused)
        return fa + fg

    @staticmethod
    def has_statistics(state: dict) -> bool:
        return "kfac_A" in state

    def refresh(self, states: List[dict], have: List[int], lams: List[float], step: int) -> bool:
        """Recompute the damped inverses of the layers ``have`` when due at optimizer ``step`` (or
        when one is missing); True when it did."""
        if not have or (step % self.inv_every and all("kfac_A_inv" in states[i] for i in have)):
            return False
        mats, mat_lams = [], []
        for i in have:
            mats += [states[i]["kfac_A"], states[i]["kfac_G"]]
            mat_lams += [lams[i], lams[i]]
        invs = damped_inverses(mats, mat_lams, self.inverse)
        for k, i in enumerate(have):
            states[i]["kfac_A_inv"], states[i]["kfac_G_inv"] = invs[2 * k], invs[2 * k + 1]
        return True

    @staticmethod
    def precondition(ts: List[torch.Tensor], states: List[dict], lams: List[float], fused: Optional[bool]):
        """(U list, [L, 3] reductions) for the gradient matrices ``ts`` of the layers whose
        ``states`` are given (the stored damped inverses; ``lams`` already applied)."""
        return ops.kfac_precondition(ts, [st["kfac_G_inv"] for st in states], [st["kfac_A_inv"] for st in states],
                                     fused=fused)

    @staticmethod
    def quadratic_form(ds: List[torch.Tensor], states: List[dict], lams: List[float]) -> torch.Tensor:
        """[L]: d_i^T F_i d_i = <(G + lam I) d_i, d_i (A + lam I)> (F = (A + lam I) (x) (G + lam I),
        vec(G d A) = (A (x) G) vec(d); A, G symmetric), in the factors' dtype."""
        out = []
        for d, st, lam in zip(ds, states, lams):
            d = d.to(st["kfac_A"].dtype)
            out.append(_damped_pair(st["kfac_G"] @ d, d @ st["kfac_A"], d, lam))
        return torch.stack(out)


class LowRankKronecker:
    """Rank-``rank`` factors from the current minibatch (no EMA, no inverse), applied by SMW:
    U = (lam I + YG^T YG)^-1 T (lam I + YA^T YA)^-1,
    (lam I + Y^T Y)^-1 = lam^-1 [I - Y^T (lam I + Y Y^T)^-1 Y]."""

    STATE = ("kfac_YA", "kfac_YG")
    collector_mode = "lowrank"

    def __init__(self, rank: int = 1):
        self.rank = int(rank)

    @staticmethod
    def update(layers: List[KFACLayer], states: List[dict], collector: FactorCollector, ready: List[int],
               fused: Optional[bool]) -> List[torch.Tensor]:
        fresh = []
        for i in ready:
            ya, yg = collector.low_rank(i)
            st = states[i]
            st["kfac_YA"], st["kfac_YG"] = ya.contiguous(), yg.contiguous()
            fresh += [st["kfac_YA"], st["kfac_YG"]]
        return fresh

    @staticmethod
    def has_statistics(state: dict) -> bool:
        return "kfac_YA" in state

    @staticmethod
    def refresh(states: List[dict], have: List[int], lams: List[float], step: int) -> bool:
        return False  # nothing to invert: SMW solves s' x s' systems at every application

    @staticmethod
    def precondition(ts: List[torch.Tensor], states: List[dict], lams: List[float], fused: Optional[bool]):
        return ops.kfac_smw_apply(ts, [st["kfac_YA"] for st in states], [st["kfac_YG"] for st in states], lams,
                                  fused=fused)

    @staticmethod
    def quadratic_form(ds: List[torch.Tensor], states: List[dict], lams: List[float]) -> torch.Tensor:
        """[L]: d_i^T F_i d_i with F = (lam I + YA^T YA) (x) (lam I + YG^T YG), from rank-s' products
        only: YG^T (YG d) and (d YA^T) YA."""
        out = []
        for d, st, lam in zip(ds, states, lams):
            ya, yg = st["kfac_YA"], st["kfac_YG"]
            d = d.to(ya.dtype)
            out.append(_damped_pair(yg.t() @ (yg @ d), (d @ ya.t()) @ ya, d, lam))
        return torch.stack(out)
