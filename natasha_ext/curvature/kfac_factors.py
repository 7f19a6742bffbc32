"""K-FAC statistics: forward/backward hooks that collect, per supported layer, the layer inputs
``a`` (with a bias column of ones) and the pre-activation gradients ``g``, and turn them into
Kronecker-factor statistics (Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a
regularized natural gradient optimization algorithm with look-ahead strategy", 2021, eqs. 8-12;
Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate curvature",
2015; Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
2016, for convolutions). The strategies of :mod:`natasha_ext.curvature.kronecker` (Kronecker
layers) and :mod:`natasha_ext.curvature.kfac_blocks` (grouped convs, embeddings, norm layers)
turn them into preconditioners.

Supported layers and their Fisher blocks: :mod:`natasha_ext.curvature.kfac_layers` (Linear,
Conv1d/2d/3d with any padding, stride, dilation and groups, Embedding, LayerNorm/RMSNorm/
GroupNorm/BatchNorm affine parameters). A layer's gradient is handled as the matrix
T = [dW | db] of shape (out, in [+1]); conv kernels are flattened to (out, C/groups * prod(k))
in the order of ``F.unfold`` patches; an Embedding's T is its (num_embeddings, dim) gradient
(its "inputs" are one-hot rows); a norm layer's T is (n, 1 or 2): weight and bias flattened.

Which gradients g are (``fisher``, :mod:`natasha_ext.curvature.fisher`): 'empirical' takes the
hooked output gradients of the training backward pass; 'mc' and 'type2' run, at the end of each
statistics-collecting forward pass of the model, extra backward passes from the model output
(sampled targets, or the columns of the loss Hessian's square root) through the same tensor
hooks, with ``torch.autograd.grad`` and ``retain_graph=True``: no ``.grad`` is touched and the
training backward that follows is unchanged. A call's statistics count once the training
backward has reached its output (as for 'empirical'), so a grad-enabled forward without a
backward (a validation pass) contributes nothing.

Scaling (B = examples in the batch, L = spatial positions of a conv output, 1 for Linear;
rows are taken over all B*L (example, position) pairs; g is the per-example gradient, i.e. the
hooked grad_output times B when the loss is a batch mean, ``batch_averaged=True``, and the
backpropagated per-example negative log-likelihood gradient for 'mc' / 'type2'):

    A = E_{b,l}[a a^T]        = rows_a^T rows_a / (B L)
    G = L * E_{b,l}[g g^T]    = (1/B) sum_{b,l} g g^T      ('mc': also averaged over the samples;
                                                             'type2': summed over the columns)
so that F ~ A (x) G is the KFC approximation of the Fisher of a conv layer (for a Linear layer
fed one example it *is* the Fisher: vec(g a^T) vec(g a^T)^T = aa^T (x) gg^T).

Low-rank statistics (IFANG, eqs. 11-13): the M = B*L rows are grouped into s' = ``rank`` groups
(contiguous blocks of examples) and replaced by their group means m_1..m_s', so
E[a a^T] ~ (1/s') sum_k m_k m_k^T = YA^T YA with YA = [m_k] / sqrt(s'), and likewise
YG = sqrt(L / s') [m_k(g)]. Because unfolding is linear, a conv layer's patch means are the
unfold of the group-mean input, so the big unfolded matrix is never formed. With 'mc' / 'type2'
each backpropagated vector gives its own s' rows of YG (weighted as G is), and YA is repeated to
match: YA^T YA is unchanged and YG^T YG is the weighted sum over the vectors. Grouped convs,
embeddings and norm layers keep their full statistics in every mode.

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
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from natasha_ext.curvature import fisher as fisher_lib
from natasha_ext.curvature.kfac_layers import (conv_patches, example_affine_grads, is_skipped, layer_kind,
                                               layer_structure, normalized_input)
from natasha_ext.precision import accumulation_dtype

__all__ = ["SUPPORTED_LAYERS", "layer_support", "find_layers", "KFACLayer", "FactorCollector"]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.RMSNorm,
                    nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def layer_support(module: nn.Module) -> Tuple[bool, str]:
    """(True, '') when K-FAC can precondition ``module``, else (False, why)."""
    structure, why = layer_structure(module)
    return structure is not None, why


def find_layers(model: nn.Module, owned: Dict[torch.Tensor, int], skip: tuple = (),
                structures: Optional[tuple] = None) -> Tuple[List["KFACLayer"], List[str]]:
    """The layers of ``model`` K-FAC preconditions: supported modules whose weight is in ``owned``
    (parameter -> param group index), with their bias when it is owned too. Returns (layers,
    fallback), fallback naming each other module with owned parameters and why it is not
    preconditioned ("name (why)"). ``skip``: entries of ``skip_layers`` (names, patterns, types;
    :func:`natasha_ext.curvature.kfac_layers.is_skipped`); ``structures``: the structures the caller
    handles (None: all), the others are listed in fallback. A layer's weight and bias must share a
    param group. Modules sharing one weight (weight tying) form one layer: one factor pair from the
    statistics of all their calls, as for a module called several times; they must share the bias
    too (or all have none)."""
    by_weight: Dict[int, Tuple[List[str], List[nn.Module], Optional[torch.Tensor], str]] = {}
    fallback, skipped_weights = [], set()
    for name, mod in model.named_modules():
        label = name or "<root>"
        own = [p for p in mod.parameters(recurse=False) if p in owned]
        if own and skip and is_skipped(name, mod, skip):
            fallback.append(f"{label} (skipped: skip_layers)")
            skipped_weights.update(id(p) for p in own)
            continue
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w not in owned:
            if own:
                fallback.append(f"{label} ({type(mod).__name__})")
            continue
        structure, why = layer_structure(mod)
        if structure is not None and structures is not None and structure not in structures:
            structure, why = None, f"{type(mod).__name__}: {structure} layers are not handled here"
        if structure is None:
            fallback.append(f"{label} ({why})")
            continue
        b = mod.bias if isinstance(getattr(mod, "bias", None), torch.Tensor) and mod.bias in owned else None
        if b is not None and owned[b] != owned[w]:
            raise ValueError(f"layer {name!r}: weight and bias are in different param groups; K-FAC "
                             "preconditions them together and needs one group")
        names, mods, bias, _ = by_weight.setdefault(id(w), ([], [], b, structure))
        if any(m is mod for m in mods):
            continue  # the same module reached under another name
        if mods and (bias is not b or type(mods[0]) is not type(mod)):
            raise ValueError(f"modules {names[0]!r} and {name!r} share their weight but not their bias (or their "
                             "type); K-FAC needs tied layers to share weight and bias (or pass both to skip_layers: "
                             "the shared weight then takes the SGD-momentum update)")
        names.append(label)
        mods.append(mod)
    layers = []
    for wid, (names, mods, b, s) in by_weight.items():
        if wid in skipped_weights:  # tied to a skipped module: its statistics would miss that use
            fallback += [f"{n} (weight shared with a module in skip_layers)" for n in names]
        else:
            layers.append(KFACLayer("+".join(names), mods, bias=b is not None, structure=s))
    return layers, fallback


def _inert_hook(*args, **kwargs):
    return None


def _make_inert():
    return _inert_hook


class _Hook:
    """Module (pre-)forward hook calling ``collector.<method>(index, ...)``; a weak link to its
    collector. Copies and pickles as an inert hook."""

    def __init__(self, collector: "FactorCollector", method: str, index: int = -1):
        self._ref = weakref.ref(collector)
        self._method = method
        self._index = index

    def __call__(self, module, *args):
        col = self._ref()
        if col is not None:
            getattr(col, self._method)(self._index, module, *args)

    def __deepcopy__(self, memo):
        return _inert_hook

    def __reduce__(self):
        return (_make_inert, ())


class KFACLayer:
    """One preconditioned layer: its module(s) (several when they share the weight), weight/bias
    parameters, ``structure`` (:data:`natasha_ext.curvature.kfac_layers.STRUCTURES`) and kind."""

    def __init__(self, name: str, modules, bias: bool, structure: Optional[str] = None):
        modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
        module = modules[0]
        self.name = name
        self.modules = modules
        self.module = module
        self.structure = structure or layer_structure(module)[0]
        self.kind = layer_kind(module)
        self.weight = module.weight
        self.bias = module.bias if bias else None
        if self.structure == "elementwise":  # T = [w | b] as (n, 1 or 2)
            self.out_features, self.in_features = self.weight.numel(), 1
        else:
            self.out_features = self.weight.shape[0]
            self.in_features = self.weight[0].numel()  # C/groups*prod(k) for conv, dim for Embedding
        self.a_dim = self.in_features + (1 if self.bias is not None else 0)
        self.groups = getattr(module, "groups", 1) if self.structure == "grouped" else 1

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
        b = m[:, self.in_features].reshape(self.bias.shape) if self.bias is not None else None
        return w, b

    def describe(self) -> str:
        """One line: module type, structure and factor sizes."""
        bias = "+bias" if self.bias is not None else ""
        if self.structure == "kronecker":
            return f"{self.kind}{bias}: Kronecker A {self.a_dim}x{self.a_dim}, G {self.out_features}x{self.out_features}"
        if self.structure == "grouped":
            a, g = self.a_dim, self.out_features // self.groups
            return f"{self.kind}{bias}: {self.groups} groups, Kronecker per group A {a}x{a}, G {g}x{g}"
        if self.structure == "diag_a":
            return (f"{self.kind}: Kronecker A diagonal {self.out_features} (token frequencies), "
                    f"G {self.in_features}x{self.in_features}")
        return f"{self.kind}{bias}: elementwise (diagonal) Fisher of {self.out_features * self.a_dim} parameters"

    def __repr__(self):
        return f"{self.name or '<root>'}({self.kind} {self.out_features}x{self.a_dim})"


class FactorCollector:
    """Registers hooks on ``layers`` and captures statistics while ``collecting`` is True.

    mode='full': keeps the inputs and output gradients of the last forward/backward (a module
    called several times in one pass contributes all its calls), turned into factor rows by
    :meth:`a_rows` / :meth:`g_rows` (Kronecker layers), :meth:`grouped_rows`, :meth:`token_counts`
    and :meth:`elementwise_fisher` (the other structures). mode='lowrank': keeps only the s'-group
    means (YA, YG) of the Kronecker layers. Statistics are cast to fp32 (fp64 for fp64 layers) at
    capture, so factors stay fp32 under AMP. ``grad_scaler``: a torch.amp.GradScaler whose scale
    is divided out of the captured gradients (its device scale tensor is read; no host sync).

    ``fisher`` ('empirical' | 'mc' | 'type2'), ``likelihood``, ``mc_samples``: see
    :mod:`natasha_ext.curvature.fisher`; 'mc' / 'type2' need ``model`` (whose output, a tensor, is
    the likelihood's parameter) and draw from a generator seeded with ``seed_fn()`` ->
    (seed, step) at each model forward (seed + 1000003 * step + the number of forwards since the
    last :meth:`clear` that a training backward reached), so that a run resumed from the
    optimizer's step counter draws the same targets and a validation forward changes nothing.
    The extra backward passes start from the output of ``model``'s own forward: layers called
    outside it get no 'mc' / 'type2' statistics (the optimizer warns, naming them).
    """

    def __init__(self, layers: List[KFACLayer], mode: str = "full", rank: int = 1,
                 batch_averaged: bool = True, grad_scaler=None, *, fisher: str = "empirical",
                 likelihood: str = "categorical", mc_samples: int = 1, model: Optional[nn.Module] = None,
                 seed_fn: Optional[Callable[[], Tuple[int, int]]] = None):
        if mode not in ("full", "lowrank"):
            raise ValueError(f"mode must be 'full' or 'lowrank', got {mode!r}")
        fisher_lib.check_fisher_args(fisher, likelihood, mc_samples)
        if fisher != "empirical" and model is None:
            raise ValueError(f"fisher={fisher!r} needs model= (its output is what the targets are drawn from)")
        self.layers = layers
        self.mode = mode
        self.rank = int(rank)
        self.batch_averaged = bool(batch_averaged)
        self.grad_scaler = grad_scaler
        self.fisher = fisher
        self.likelihood = likelihood
        self.mc_samples = int(mc_samples)
        self._seed_fn = seed_fn or (lambda: (0, 0))
        self._fisher_weight = 1.0
        self.collecting = True
        self.shard = (0, 1)  # (rank, world size): low-rank groups span the global batch
        # per layer, the calls captured since the last clear(): [module, input stat, grad stat,
        # fisher grads, model pass]; the grad stat stays None until a backward pass reaches that
        # call's output, so a grad-enabled forward without backward (a validation pass)
        # contributes nothing
        self._calls: Dict[int, List[list]] = {}
        self._pass = 0             # model forwards seen (tags the calls made inside each)
        self._counted = set()      # the model passes a training backward reached since clear()
        self._fisher_pass = None   # the model pass whose Fisher backward is running
        self._handles = []
        # 'mc' / 'type2' tag each call with its model pass: their hooks run eagerly under
        # torch.compile (a traced hook would read a stale pass number)
        forward = "_forward" if fisher == "empirical" else "_forward_eager"
        for i, layer in enumerate(layers):
            for module in layer.modules:
                self._handles.append(module.register_forward_hook(_Hook(self, forward, i)))
        if fisher != "empirical":
            self._handles.append(model.register_forward_pre_hook(_Hook(self, "_model_start")))
            self._handles.append(model.register_forward_hook(_Hook(self, "_model_output")))

    # ------------------------------------------------------------------ hooks
    def _stat_dtype(self, i):
        return accumulation_dtype(self.layers[i].weight)

    def _lowrank(self, i) -> bool:
        return self.mode == "lowrank" and self.layers[i].structure == "kronecker"

    def _forward(self, i: int, module, inputs, output):
        layer = self.layers[i]
        if not self.collecting or not torch.is_grad_enabled() or not any(module is m for m in layer.modules):
            return
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = inputs[0].detach()
        if self._lowrank(i):
            stat = self._lowrank_a(layer, module, x.to(self._stat_dtype(i)))
        else:
            stat = x
        call = [module, stat, None, [], self._pass]
        self._calls.setdefault(i, []).append(call)
        ref = weakref.ref(self)

        def grad_hook(grad, i=i, call=call):
            col = ref()
            if col is None or not col.collecting:
                return
            if col._fisher_pass is not None:  # an extra backward of 'mc' / 'type2'
                if call[4] == col._fisher_pass:
                    call[3].append(col._fisher_grad(i, grad))
            elif col.fisher == "empirical":
                call[2] = col._backward(i, grad)
            elif call[3]:
                call[2] = True  # the training backward reached it: its Fisher grads count
                col._counted.add(call[4])

        output.register_hook(grad_hook)

    _forward_eager = torch.compiler.disable(_forward)

    def _backward(self, i: int, grad: torch.Tensor):
        g = grad.detach().to(self._stat_dtype(i))
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            scale = getattr(self.grad_scaler, "_scale", None)
            if scale is not None:
                g = g / scale.to(device=g.device, dtype=g.dtype)
        if self._lowrank(i):
            g = self._lowrank_g(self.layers[i], g)
        return g

    def _fisher_grad(self, i: int, grad: torch.Tensor):
        g = grad.detach().to(self._stat_dtype(i))
        return self._lowrank_g(self.layers[i], g) if self._lowrank(i) else g

    @torch.compiler.disable
    def _model_start(self, _, module, args):
        self._pass += 1

    @torch.compiler.disable  # eager, seeded draws also inside a compiled training step
    def _model_output(self, _, module, args, output):
        """'mc' / 'type2': backpropagate the likelihood's vectors from the model output through the
        hooked layers of this forward pass (their grad hooks store the gradients). Runs outside
        autocast (the statistics are fp32/fp64 math); each rank of a process group draws from its
        own stream (seed * world + rank)."""
        if not self.collecting or not torch.is_grad_enabled():
            return
        current = self._pass
        hooked = [i for i, calls in self._calls.items() if any(c[4] == current for c in calls)]
        if not hooked:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"fisher={self.fisher!r} needs the model's output to be a tensor (the "
                            f"{self.likelihood} likelihood's parameters), got {type(output).__name__}; use "
                            "fisher='empirical', or a model whose forward returns the logits / predictions")
        if not output.requires_grad:
            return
        base, step = self._seed_fn()
        rank, world = self.shard
        gen = torch.Generator(device=output.device)
        # passes without a training backward (validation) leave the later draws unchanged
        gen.manual_seed(((int(base) + 1000003 * int(step) + len(self._counted)) * world + rank) % 2 ** 63)
        weights = list({id(self.layers[i].weight): self.layers[i].weight for i in hooked}.values())
        with torch.autocast(output.device.type, enabled=False):
            vectors, self._fisher_weight = fisher_lib.output_gradients(output, self.fisher, self.likelihood,
                                                                       self.mc_samples, gen)
            self._fisher_pass = current
            try:
                for v in vectors:
                    torch.autograd.grad(output, weights, grad_outputs=v, retain_graph=True, allow_unused=True)
            finally:
                self._fisher_pass = None

    def _complete(self, i: int) -> List[list]:
        """The calls of layer i whose backward has run (in forward order)."""
        return [c for c in self._calls.get(i, ()) if c[2] is not None]

    # ------------------------------------------------------------------ full statistics
    @staticmethod
    def _batch(x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 1 else 1

    def _grads(self, i: int) -> Tuple[List[Tuple[list, torch.Tensor]], float]:
        """([(call, g)] over the completed calls (and the Fisher vectors), s) with
        G = s * sum g g^T over the rows of every g."""
        calls = self._complete(i)
        if self.fisher == "empirical":
            gs = [(c, c[2]) for c in calls]
            batch = sum(self._batch(g) for _, g in gs)
            return gs, (float(batch) if self.batch_averaged else 1.0 / batch)
        gs = [(c, g) for c in calls for g in c[3]]
        batch = sum(self._batch(c[3][0]) for c in calls)
        return gs, self._fisher_weight / batch

    def _a_rows_one(self, layer: KFACLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(accumulation_dtype(layer.weight))
        if layer.kind.startswith("conv"):
            cols = conv_patches(x, m)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            rows = x.reshape(-1, x.shape[-1])
        if layer.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        return rows

    def _g_rows_one(self, layer: KFACLayer, g: torch.Tensor) -> torch.Tensor:
        if layer.kind.startswith("conv"):
            n = layer.weight.dim() - 2
            if g.dim() == n + 1:
                g = g.unsqueeze(0)
            return g.permute(0, *range(2, 2 + n), 1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    def _check_structure(self, i: int, *structures: str) -> KFACLayer:
        layer = self.layers[i]
        if layer.structure not in structures:
            raise ValueError(f"layer {layer.name!r} is a {layer.structure} layer; this statistic is for "
                             f"{' / '.join(structures)} layers")
        return layer

    def a_rows(self, i: int) -> Tuple[torch.Tensor, float]:
        """(rows, scale) with A = scale * rows^T rows = E_{b,l}[a a^T] (Kronecker layers)."""
        layer = self._check_structure(i, "kronecker")
        rows = torch.cat([self._a_rows_one(layer, c[0], c[1]) for c in self._complete(i)], 0)
        return rows, 1.0 / rows.shape[0]

    def g_rows(self, i: int) -> Tuple[torch.Tensor, float]:
        """(rows, scale) with G = scale * rows^T rows = (1/B) sum_{b,l} g g^T (g per example;
        Kronecker and Embedding layers)."""
        layer = self._check_structure(i, "kronecker", "diag_a")
        gs, scale = self._grads(i)
        rows = torch.cat([self._g_rows_one(layer, g) for _, g in gs], 0)
        return rows, scale

    def example_rows(self, i: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per captured call of layer i, its (a, g) rows as [B, L, dim] (example, position):
        the rows of :meth:`a_rows` / :meth:`g_rows` grouped by example, so that the per-example
        gradient of the call is sum_l g[b, l] a[b, l]^T (times g_rows' per-example factor)."""
        out = []
        for call in self._complete(i):
            m, x, g = call[0], call[1], call[2]
            a, gr = self._a_rows_one(self.layers[i], m, x), self._g_rows_one(self.layers[i], g)
            b = self._batch(g)
            out.append((a.reshape(b, -1, a.shape[1]), gr.reshape(b, -1, gr.shape[1])))
        return out

    def grouped_rows(self, i: int) -> Tuple[torch.Tensor, float, torch.Tensor, float]:
        """(A rows [groups, M, a], sA, G rows [groups, M', out/groups], sG) of a grouped conv:
        group g's factors are sA * rows[g]^T rows[g] and sG * rows[g]^T rows[g]."""
        layer = self._check_structure(i, "grouped")
        k = layer.groups
        a = torch.cat([self._a_rows_one_grouped(layer, c[0], c[1]) for c in self._complete(i)], 1)
        gs, scale = self._grads(i)
        g = torch.cat([self._g_rows_one(layer, g) for _, g in gs], 0)
        g = g.reshape(g.shape[0], k, -1).transpose(0, 1)
        return a, 1.0 / a.shape[1], g, scale

    def _a_rows_one_grouped(self, layer: KFACLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cols = conv_patches(x.to(accumulation_dtype(layer.weight)), m)  # (B, C*K, L)
        b, ck, L = cols.shape
        rows = cols.reshape(b, layer.groups, ck // layer.groups, L).permute(1, 0, 3, 2)
        rows = rows.reshape(layer.groups, b * L, ck // layer.groups)
        if layer.bias is not None:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], 2)
        return rows

    def token_counts(self, i: int) -> Tuple[torch.Tensor, float]:
        """(counts [num_embeddings], scale) with the Embedding's A = scale * diag(counts): the
        frequency of each token among the looked-up ones (the exact A of one-hot inputs)."""
        layer = self._check_structure(i, "diag_a")
        idx = torch.cat([c[1].reshape(-1) for c in self._complete(i)])
        counts = torch.bincount(idx, minlength=layer.out_features).to(accumulation_dtype(layer.weight))
        return counts, 1.0 / max(idx.numel(), 1)

    def elementwise_fisher(self, i: int) -> torch.Tensor:
        """(n, 1 or 2): the diagonal Fisher of a norm layer's weight (column 0) and bias (column
        1), the scaled sum over examples (and Fisher vectors) of squared per-example gradients."""
        layer = self._check_structure(i, "elementwise")
        gs, scale = self._grads(i)
        dt = accumulation_dtype(layer.weight)
        total = None
        for c, g in gs:
            x_hat = normalized_input(c[0], c[1].to(dt))
            per_example = example_affine_grads(c[0], x_hat, g.to(dt), layer.bias is not None)
            sq = per_example.square().sum(0)
            total = sq if total is None else total + sq
        return total * scale

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
        # the hooks run inside the user's autocast region: the statistics' products stay in x's dtype
        with torch.autocast(x.device.type, enabled=False):
            return self._lowrank_a_rows(layer, m, x)

    def _lowrank_a_rows(self, layer: KFACLayer, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.kind.startswith("conv"):
            if x.dim() == layer.weight.dim() - 1:
                x = x.unsqueeze(0)
            w = self._group_weights(x.shape[0], x.dtype, x.device)
            # unfold is linear: the group means of the patches are the patches of the group means
            xm = torch.einsum("kb,b...->k...", w, x)
            mean = conv_patches(xm, m).mean(-1)
        else:
            x2 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
            w = self._group_weights(x2.shape[0], x.dtype, x.device)
            mean = w @ x2.mean(1)
        if layer.bias is not None:  # the mean of the ones column (its share on this rank)
            mean = torch.cat([mean, w.sum(1, keepdim=True)], 1)
        return mean

    def _lowrank_g(self, layer: KFACLayer, g: torch.Tensor):
        with torch.autocast(g.device.type, enabled=False):  # as _lowrank_a
            return self._lowrank_g_rows(layer, g)

    def _lowrank_g_rows(self, layer: KFACLayer, g: torch.Tensor):
        if layer.kind.startswith("conv"):
            n = layer.weight.dim() - 2
            if g.dim() == n + 1:
                g = g.unsqueeze(0)
            positions = math.prod(g.shape[2:])
            per_ex = g.mean(tuple(range(2, 2 + n)))
        else:
            g3 = g.reshape(g.shape[0], -1, g.shape[-1]) if g.dim() > 1 else g.reshape(1, 1, -1)
            positions = g3.shape[1]
            per_ex = g3.mean(1)
        w = self._group_weights(per_ex.shape[0], per_ex.dtype, per_ex.device)
        return w @ per_ex, g.shape[0] if g.dim() > 1 else 1, positions

    def low_rank(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(YA, YG) with A ~ YA^T YA and G ~ YG^T YG from the s' group means (eqs. 11-12)."""
        self._check_structure(i, "kronecker")
        calls = self._complete(i)
        ya = torch.cat([c[1] for c in calls], 0) if len(calls) > 1 else calls[0][1]
        k = ya.shape[0]
        ya = ya / math.sqrt(k)
        if self.fisher != "empirical":  # one set of s' rows per Fisher vector
            n_vec = len(calls[0][3])
            ygs = []
            for v in range(n_vec):
                parts = [c[3][v] for c in calls]
                gm = torch.cat([p[0] for p in parts], 0) if len(parts) > 1 else parts[0][0]
                ygs.append(gm * math.sqrt(parts[0][2] * self._fisher_weight / gm.shape[0]))
            return torch.cat([ya] * n_vec, 0) / math.sqrt(n_vec), torch.cat(ygs, 0)
        parts = [c[2] for c in calls]
        gm = torch.cat([p[0] for p in parts], 0) if len(parts) > 1 else parts[0][0]
        batch = sum(p[1] for p in parts)
        positions = parts[0][2]
        per_example = float(batch) if self.batch_averaged else 1.0  # grad_output -> per-example grad
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
        self._counted.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
