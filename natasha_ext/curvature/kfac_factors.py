"""K-FAC statistics: forward/backward hooks that collect, per supported layer, the layer inputs
``a`` (with a bias column of ones) and the pre-activation gradients ``g``, and turn them into
Kronecker-factor statistics (Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a
regularized natural gradient optimization algorithm with look-ahead strategy", 2021, eqs. 8-12;
Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature",
2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
2016, for convolutions). The strategies of :mod:`natasha_ext.curvature.kronecker` turn them
into preconditioners.

Supported layers: ``nn.Linear`` and ``nn.Conv2d`` (groups=1, numeric padding, zeros padding
mode). A layer's gradient is handled as the matrix T = [dW | db] of shape (out, in [+1]); conv
kernels are flattened to (out, C*kh*kw) in the order of ``F.unfold`` patches.

Scaling (B = examples in the batch, L = spatial positions of a conv output, 1 for Linear;
rows are taken over all B*L (example, position) pairs; g is the per-example gradient, i.e. the
hooked grad_output times B when the loss is a batch mean, ``batch_averaged=True``):

    A = E_{b,l}[a a^T]        = rows_a^T rows_a / (B L)
    G = L * E_{b,l}[g g^T]    = (1/B) sum_{b,l} g g^T
so that F ~ A (x) G is the KFC approximation of the empirical Fisher of a conv layer (for a
Linear layer fed one example it *is* the empirical Fisher: vec(g a^T) vec(g a^T)^T = aa^T (x) gg^T).

Low-rank statistics (IFANG, eqs. 11-13): the M = B*L rows are grouped into s' = ``rank`` groups
(contiguous blocks of examples) and replaced by their group means m_1..m_s', so
E[a a^T] ~ (1/s') sum_k m_k m_k^T = YA^T YA with YA = [m_k] / sqrt(s'), and likewise
YG = sqrt(L / s') [m_k(g)]. Because unfolding is linear, a conv layer's patch means are the
unfold of the group-mean input, so the big unfolded matrix is never formed.

Distributed (``shard = (rank, world)``, equal shards): the groups are laid out over the *global*
batch (world * B examples, rank r holding examples [r B, (r+1) B)), and each rank produces its
share  world * (sum of its examples in group k) / |group k|;  the average of the shares over the
ranks (one all-reduce) is exactly the group mean one process computes on the whole batch, for any
s' and world size.

Hooks hold only weak references to the collector; the hook objects deep-copy and pickle as inert
no-ops (a copied or saved model carries no live link to an optimizer), and ``remove()`` (called by
the optimizers' ``remove_hooks()`` and when they are garbage collected) unregisters them.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.precision import accumulation_dtype

__all__ = ["SUPPORTED_LAYERS", "layer_support", "find_layers", "KFACLayer", "FactorCollector"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def layer_support(module: nn.Module) -> Tuple[bool, str]:
    """(True, '') when K-FAC can precondition ``module``, else (False, why)."""
    if isinstance(module, nn.Linear):
        return True, ""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return False, f"grouped conv (groups={module.groups})"
        if isinstance(module.padding, str) and module.padding != "valid":
            return False, f"padding={module.padding!r}"
        if module.padding_mode != "zeros":
            return False, f"padding_mode={module.padding_mode!r}"
        return True, ""
    return False, type(module).__name__


def find_layers(model: nn.Module, owned: Dict[torch.Tensor, int]) -> Tuple[List["KFACLayer"], List[str]]:
    """The layers of ``model`` K-FAC preconditions: supported modules whose weight is in ``owned``
    (parameter -> param group index), with their bias when it is owned too. Returns (layers,
    fallback), fallback naming each other module with owned parameters and why it is not
    preconditioned. A layer's weight and bias must share a param group. Modules sharing one
    weight (weight tying) form one layer: one factor pair from the statistics of all their calls,
    as for a module called several times; they must share the bias too (or all have none)."""
    by_weight: Dict[int, Tuple[List[str], List[nn.Module], Optional[torch.Tensor]]] = {}
    fallback = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w not in owned:
            if any(p in owned for p in mod.parameters(recurse=False)):
                fallback.append(f"{name or '<root>'} ({type(mod).__name__})")
            continue
        ok, why = layer_support(mod)
        if not ok:
            fallback.append(f"{name or '<root>'} ({why})")
            continue
        b = mod.bias if isinstance(getattr(mod, "bias", None), torch.Tensor) and mod.bias in owned else None
        if b is not None and owned[b] != owned[w]:
            raise ValueError(f"layer {name!r}: weight and bias are in different param groups; K-FAC "
                             "preconditions them together and needs one group")
        names, mods, bias = by_weight.setdefault(id(w), ([], [], b))
        if any(m is mod for m in mods):
            continue  # the same module reached under another name
        if mods and (bias is not b or type(mods[0]) is not type(mod)):
            raise ValueError(f"modules {names[0]!r} and {name!r} share their weight but not their bias (or their "
                             "type); K-FAC needs tied layers to share weight and bias")
        names.append(name or "<root>")
        mods.append(mod)
    layers = [KFACLayer("+".join(names), mods, bias=b is not None) for names, mods, b in by_weight.values()]
    return layers, fallback


def _inert_hook(*args, **kwargs):
    return None


def _make_inert():
    return _inert_hook


class _ForwardHook:
    """Module forward hook; a weak link to its collector. Copies and pickles as an inert hook."""

    def __init__(self, collector: "FactorCollector", index: int):
        self._ref = weakref.ref(collector)
        self._index = index

    def __call__(self, module, inputs, output):
        col = self._ref()
        if col is not None:
            col._forward(self._index, module, inputs, output)

    def __deepcopy__(self, memo):
        return _inert_hook

    def __reduce__(self):
        return (_make_inert, ())


class KFACLayer:
    """One preconditioned layer: its module(s) (several when they share the weight), weight/bias
    parameters and kind."""

    def __init__(self, name: str, modules, bias: bool):
        modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        module = modules[0]
        self.name = name
        self.modules = modules
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        self.weight = module.weight
        self.bias = module.bias if bias else None
        self.out_features = self.weight.shape[0]
        self.in_features = self.weight[0].numel()  # C*kh*kw for conv
        self.a_dim = self.in_features + (1 if self.bias is not None else 0)

    def params(self) -> List[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def grad_matrix(self, gw: torch.Tensor, gb: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """T = [dW | db] as an (out, in [+1]) matrix in ``dtype``."""
        w = gw.reshape(self.out_features, -1).to(dtype)
        if self.bias is None:
            return w.contiguous()  # read-only downstream: a view of the gradient is fine
        return torch.cat([w, gb.reshape(-1, 1).to(dtype)], 1)

    def split(self, m: torch.Tensor):
        """Inverse of grad_matrix: (weight-shaped, bias-shaped or None) views of ``m``."""
        w = m[:, : self.in_features].reshape(self.weight.shape)
        b = m[:, self.in_features] if self.bias is not None else None
        return w, b

    def __repr__(self):
        return f"{self.name or '<root>'}({self.kind} {self.out_features}x{self.a_dim})"


class FactorCollector:
    """Registers hooks on ``layers`` and captures statistics while ``collecting`` is True.

    mode='full': keeps the inputs and output gradients of the last forward/backward (a module
    called several times in one pass contributes all its calls), turned into factor rows by
    :meth:`a_rows` / :meth:`g_rows`. mode='lowrank': keeps only the s'-group means (YA, YG).
    Statistics are cast to fp32 (fp64 for fp64 layers) at capture, so factors stay fp32 under
    AMP. ``grad_scaler``: a torch.amp.GradScaler whose scale is divided out of the captured
    gradients (its device scale tensor is read; no host sync)."""

    def __init__(self, layers: List[KFACLayer], mode: str = "full", rank: int = 1,
                 batch_averaged: bool = True, grad_scaler=None):
        if mode not in ("full", "lowrank"):
            raise ValueError(f"mode must be 'full' or 'lowrank', got {mode!r}")
        self.layers = layers
        self.mode = mode
        self.rank = int(rank)
        self.batch_averaged = bool(batch_averaged)
        self.grad_scaler = grad_scaler
        self.collecting = True
        self.shard = (0, 1)  # (rank, world size): low-rank groups span the global batch
        # per layer, the calls captured since the last clear(): [module, input stat, grad stat];
        # the grad stat stays None until a backward pass reaches that call's output, so a
        # grad-enabled forward without backward (a validation pass) contributes nothing
        self._calls: Dict[int, List[list]] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            for module in layer.modules:
                self._handles.append(module.register_forward_hook(_ForwardHook(self, i)))

    # ------------------------------------------------------------------ hooks
    def _stat_dtype(self, i):
        return accumulation_dtype(self.layers[i].weight)

    def _forward(self, i: int, module, inputs, output):
        layer = self.layers[i]
        if not self.collecting or not torch.is_grad_enabled() or not any(module is m for m in layer.modules):
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = inputs[0].detach()
        dt = self._stat_dtype(i)
        if self.mode == "lowrank":
            stat = self._lowrank_a(layer, module, x.to(dt))
        else:
            stat = x
        call = [module, stat, None]
        self._calls.setdefault(i, []).append(call)
        ref = weakref.ref(self)

        def grad_hook(grad, i=i, call=call):
            col = ref()
            if col is not None and col.collecting:
                call[2] = col._backward(i, grad)

        output.register_hook(grad_hook)

    def _backward(self, i: int, grad: torch.Tensor):
        g = grad.detach().to(self._stat_dtype(i))
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale = getattr(self.grad_scaler, "_scale", None)
            if scale is not None:
                g = g / scale.to(device=g.device, dtype=g.dtype)
        if self.mode == "lowrank":
            g = self._lowrank_g(self.layers[i], g)
        return g

    def _complete(self, i: int) -> List[list]:
        """The calls of layer i whose backward has run (in forward order)."""
        return [c for c in self._calls.get(i, ()) if c[2] is not None]

    # ------------------------------------------------------------------ full statistics
    @staticmethod
    def _batch(x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 1 else 1

    def _a_rows_one(self, layer: KFACLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(accumulation_dtype(layer.weight))
        if layer.kind == "conv2d":
            if x.dim() == 3:
                x = x.unsqueeze(0)
            pad = m.padding if not isinstance(m.padding, str) else 0
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        if layer.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        return rows

    def _g_rows_one(self, layer: KFACLayer, g: torch.Tensor) -> torch.Tensor:
        if layer.kind == "conv2d":
            if g.dim() == 3:
                g = g.unsqueeze(0)
            return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    def a_rows(self, i: int) -> Tuple[torch.Tensor, float]:
        """(rows, scale) with A = scale * rows^T rows = E_{b,l}[a a^T]."""
        rows = torch.cat([self._a_rows_one(self.layers[i], c[0], c[1]) for c in self._complete(i)], 0)
        return rows, 1.0 / rows.shape[0]

    def g_rows(self, i: int) -> Tuple[torch.Tensor, float]:
        """(rows, scale) with G = scale * rows^T rows = (1/B) sum_{b,l} g g^T (g per example)."""
        gs = [c[2] for c in self._complete(i)]
        rows = torch.cat([self._g_rows_one(self.layers[i], g) for g in gs], 0)
        batch = sum(self._batch(g) for g in gs)
        scale = float(batch) if self.batch_averaged else 1.0 / batch
        return rows, scale

    def example_rows(self, i: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per captured call of layer i, its (a, g) rows as [B, L, dim] (example, position):
        the rows of :meth:`a_rows` / :meth:`g_rows` grouped by example, so that the per-example
        gradient of the call is sum_l g[b, l] a[b, l]^T (times g_rows' per-example factor)."""
        out = []
        for m, x, g in self._complete(i):
            a, gr = self._a_rows_one(self.layers[i], m, x), self._g_rows_one(self.layers[i], g)
            b = self._batch(g)
            out.append((a.reshape(b, -1, a.shape[1]), gr.reshape(b, -1, gr.shape[1])))
        return out

    # ------------------------------------------------------------------ low-rank statistics
    def _group_weights(self, n: int, dtype, device) -> torch.Tensor:
        """[s', n] weights W such that W @ rows gives this rank's share of the s' group means of
        the global batch (see the module docstring); the plain group means on one process."""
        r, world = self.shard
        total = n * world
        k = max(1, min(self.rank, total))
        w = torch.zeros(k, n, dtype=dtype)
        size, extra = divmod(total, k)  # tensor_split's layout: the first `extra` groups are one longer
        start = 0
        for j in range(k):
            stop = start + size + (1 if j < extra else 0)
            lo, hi = max(start, r * n), min(stop, (r + 1) * n)  # this rank's rows of group j
            if hi > lo:
                w[j, lo - r * n:hi - r * n] = world / (stop - start)
            start = stop
        return w.to(device)

    def _lowrank_a(self, layer: KFACLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.kind == "conv2d":
            if x.dim() == 3:
                x = x.unsqueeze(0)
            pad = m.padding if not isinstance(m.padding, str) else 0
            w = self._group_weights(x.shape[0], x.dtype, x.device)
            # unfold is linear: the group means of the patches are the patches of the group means
            xm = torch.einsum("kb,bchw->kchw", w, x)
            cols = F.unfold(xm, m.kernel_size, dilation=m.dilation, padding=pad, stride=m.stride)
            mean = cols.mean(-1)
        else:
            x2 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
            w = self._group_weights(x2.shape[0], x.dtype, x.device)
            mean = w @ x2.mean(1)
        if layer.bias is not None:  # the mean of the ones column (its share on this rank)
            mean = torch.cat([mean, w.sum(1, keepdim=True)], 1)
        return mean

    def _lowrank_g(self, layer: KFACLayer, g: torch.Tensor):
        if layer.kind == "conv2d":
            if g.dim() == 3:
                g = g.unsqueeze(0)
            positions = g.shape[2] * g.shape[3]
            per_ex = g.mean((2, 3))
        else:
            g3 = g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)
            positions = g3.shape[1]
            per_ex = g3.mean(1)
        w = self._group_weights(per_ex.shape[0], per_ex.dtype, per_ex.device)
        return w @ per_ex, g.shape[0] if g.dim() > 1 else 1, positions

    def low_rank(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(YA, YG) with A ~ YA^T YA and G ~ YG^T YG from the s' group means (eqs. 11-12)."""
        calls = self._complete(i)
        ya = torch.cat([c[1] for c in calls], 0) if len(calls) > 1 else calls[0][1]
        parts = [c[2] for c in calls]
        gm = torch.cat([p[0] for p in parts], 0) if len(parts) > 1 else parts[0][0]
        batch = sum(p[1] for p in parts)
        positions = parts[0][2]
        k = ya.shape[0]
        per_example = float(batch) if self.batch_averaged else 1.0  # grad_output -> per-example grad
        ya = ya / math.sqrt(k)
        yg = gm * (per_example * math.sqrt(positions / gm.shape[0]))
        return ya, yg

    # ------------------------------------------------------------------ bookkeeping
    def ready(self, i: int) -> bool:
        """True when layer i has at least one call captured in a forward *and* a backward pass."""
        return any(c[2] is not None for c in self._calls.get(i, ()))

    def captured_without_backward(self, i: int) -> bool:
        """True when layer i was called with grad enabled but no backward reached it."""
        return bool(self._calls.get(i)) and not self.ready(i)

    def clear(self) -> None:
        self._calls.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
