"""K-FAC blocks that are not one dense Kronecker product, next to a Kronecker strategy of
:mod:`natasha_ext.curvature.kronecker` that handles the Linear / Conv(groups=1) layers.

:class:`LayerwiseCurvature` wraps that strategy (same interface: ``update``, ``has_statistics``,
``refresh``, ``precondition``; its other attributes read and write through) and preconditions
the other structures of :mod:`natasha_ext.curvature.kfac_layers` itself, with the optimizer's
damping gamma (lam = sqrt(gamma) per factor, as for the Kronecker layers):

* grouped convs: per group g, U_g = (G_g + lam I)^-1 T_g (A_g + lam I)^-1 (Grosse & Martens,
  "A Kronecker-factored approximate Fisher matrix for convolution layers", 2016, applied to each
  group's independent weights), factors stacked [groups, n, n];
* embeddings: U = diag(1 / (a + lam)) T (G + lam I)^-1 with a the token frequencies (the K-FAC
  A of one-hot inputs is exactly diagonal) and T the (num_embeddings, dim) gradient;
* norm layers: U = T / (F + gamma), F the diagonal (elementwise) Fisher of weight and bias.

Factors are exponential moving averages with the wrapped strategy's ``stat_decay`` (0 for
IFANG's low-rank strategy: the current minibatch's factors), their inverses refreshed every
``inv_every`` steps (every step for IFANG). State keys per structure are in ``STATE``.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional

import torch

from natasha_ext.curvature.kfac_factors import FactorCollector, KFACLayer
from natasha_ext.curvature.kronecker import damped_inverses
from natasha_ext.precision import accumulation_dtype

__all__ = ["LayerwiseCurvature"]

_KEYS: Dict[str, tuple] = {
    "grouped": ("kfac_group_A", "kfac_group_G"),
    "diag_a": ("kfac_token_A", "kfac_token_G"),
    "elementwise": ("kfac_diag_F",),
}


def _inv(key: str) -> str:
    return key + "_inv"


class LayerwiseCurvature:
    """A Kronecker strategy (``inner``) for the Kronecker layers, grouped/embedding/elementwise
    blocks for the others (see the module docstring)."""

    STATE = tuple(k for keys in _KEYS.values() for key in keys for k in (key, _inv(key)))

    def __init__(self, inner):
        self.__dict__["inner"] = inner

    # the wrapped strategy's settings (stat_decay, inv_every, rank, collector_mode, ...)
    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["inner"], name, value)

    def __getstate__(self):
        return {"inner": self.__dict__["inner"]}

    def __setstate__(self, state):
        self.__dict__["inner"] = state["inner"]

    @staticmethod
    def _structure(state: dict) -> Optional[str]:
        for structure, keys in _KEYS.items():
            if keys[0] in state:
                return structure
        return None

    # ------------------------------------------------------------------ statistics
    def update(self, layers: List[KFACLayer], states: List[dict], collector: FactorCollector, ready: List[int],
               fused: Optional[bool]) -> List[torch.Tensor]:
        kron = [i for i in ready if layers[i].structure == "kronecker"]
        out = self.inner.update(layers, states, collector, kron, fused) if kron else []
        decay = float(getattr(self.inner, "stat_decay", 0.0))
        for i in ready:
            structure = layers[i].structure
            if structure == "kronecker":
                continue
            st = states[i]
            if structure == "grouped":
                a, sa, g, sg = collector.grouped_rows(i)
                new = [torch.bmm(a.transpose(1, 2), a) * sa, torch.bmm(g.transpose(1, 2), g) * sg]
            elif structure == "diag_a":
                counts, sa = collector.token_counts(i)
                g, sg = collector.g_rows(i)
                new = [counts * sa, (g.t() @ g) * sg]
            else:
                new = [collector.elementwise_fisher(i)]
            for key, value in zip(_KEYS[structure], new):
                if key in st and decay:  # the EMA; a layer's first update starts it
                    st[key].mul_(decay).add_(value, alpha=1.0 - decay)
                elif key in st:  # decay 0 (IFANG: the minibatch's factors): nothing old propagates
                    st[key].copy_(value)
                else:
                    st[key] = value.contiguous()
                out.append(st[key])
        return out

    def has_statistics(self, state: dict) -> bool:
        return self.inner.has_statistics(state) or self._structure(state) is not None

    def refresh(self, states: List[dict], have: List[int], lams: List[float], step: int) -> bool:
        kron = [i for i in have if self.inner.has_statistics(states[i])]
        did = bool(kron) and self.inner.refresh(states, kron, lams, step)
        every = int(getattr(self.inner, "inv_every", 1))
        for i in have:
            st, structure = states[i], self._structure(states[i])
            if structure is None or (step % every and all(_inv(k) in st for k in _KEYS[structure])):
                continue
            lam = lams[i]
            if structure == "grouped":
                for key in _KEYS[structure]:
                    st[_inv(key)] = torch.stack(damped_inverses(list(st[key]), [lam] * st[key].shape[0]))
            elif structure == "diag_a":
                a, g = _KEYS[structure]
                st[_inv(a)] = 1.0 / (st[a] + lam)
                st[_inv(g)] = damped_inverses([st[g]], [lam])[0]
            else:
                (f,) = _KEYS[structure]
                st[_inv(f)] = 1.0 / (st[f] + lam * lam)
            did = True
        return did

    # ------------------------------------------------------------------ preconditioning
    def precondition(self, ts: List[torch.Tensor], states: List[dict], lams: List[float], fused: Optional[bool]):
        """(U list, [L, 3] reductions (<T,U>, ||U||^2, ||T||^2)) in the order of ``ts``."""
        own = [j for j, st in enumerate(states) if self._structure(st) is not None]
        if not own:
            return self.inner.precondition(ts, states, lams, fused)
        kron = [j for j in range(len(ts)) if j not in set(own)]
        acc = accumulation_dtype(list(ts))
        red = torch.zeros(len(ts), 3, dtype=acc, device=ts[0].device)
        us: List[Optional[torch.Tensor]] = [None] * len(ts)
        if kron:
            k_us, k_red = self.inner.precondition([ts[j] for j in kron], [states[j] for j in kron],
                                                  [lams[j] for j in kron], fused)
            for r, j in enumerate(kron):
                us[j] = k_us[r]
            red[kron] = k_red.to(acc)
        for j in own:
            t, st = ts[j], states[j]
            structure = self._structure(st)
            if structure == "grouped":
                a_inv, g_inv = st[_inv("kfac_group_A")], st[_inv("kfac_group_G")]
                tg = t.reshape(a_inv.shape[0], -1, t.shape[1])
                u = torch.bmm(torch.bmm(g_inv, tg.to(g_inv.dtype)), a_inv).reshape(t.shape)
            elif structure == "diag_a":
                u = (t * st[_inv("kfac_token_A")][:, None]) @ st[_inv("kfac_token_G")]
            else:
                u = t * st[_inv("kfac_diag_F")]
            u = u.to(t.dtype)
            us[j] = u
            t64, u64 = t.to(acc), u.to(acc)
            red[j] = torch.stack([(t64 * u64).sum(), u64.square().sum(), t64.square().sum()])
        return us, red

    def quadratic_form(self, ds: List[torch.Tensor], states: List[dict], lams: List[float]) -> torch.Tensor:
        """[L]: d_i^T F_i d_i with each layer's damped block (the KL clip of the step taken), in
        the order of ``ds``: the inner strategy's for Kronecker layers, the forms above otherwise."""
        own = {j for j, st in enumerate(states) if self._structure(st) is not None}
        kron = [j for j in range(len(ds)) if j not in own]
        out: List[Optional[torch.Tensor]] = [None] * len(ds)
        if kron:
            k_q = self.inner.quadratic_form([ds[j] for j in kron], [states[j] for j in kron], [lams[j] for j in kron])
            for r, j in enumerate(kron):
                out[j] = k_q[r]
        for j in sorted(own):
            st, lam, structure = states[j], lams[j], self._structure(states[j])
            if structure == "grouped":
                a, g = st["kfac_group_A"], st["kfac_group_G"]
                d = ds[j].to(a.dtype).reshape(a.shape[0], -1, ds[j].shape[1])
                out[j] = ((torch.bmm(g, d) + lam * d) * (torch.bmm(d, a) + lam * d)).sum()
            elif structure == "diag_a":
                a, g = st["kfac_token_A"], st["kfac_token_G"]
                d = ds[j].to(g.dtype)
                out[j] = (d * ((a + lam)[:, None] * (d @ g + lam * d))).sum()
            else:
                f = st["kfac_diag_F"]
                d = ds[j].to(f.dtype)
                out[j] = (d.square() * (f + lam * lam)).sum()
        acc = functools.reduce(torch.promote_types, (q.dtype for q in out))
        return torch.stack([q.to(acc) for q in out])
