"""The ONE list of optimizer cases the conformity, AMP/compile, non-finite and distributed suites
run over. A new optimizer (or an interesting configuration of one) is covered by adding one
``Case`` to ``ZOO``.

Every case trains the same tiny problem: an MLP (5 -> 8 -> 3, tanh) on fixed synthetic batches
with a mean-squared-error loss. ``Problem.closure(i)`` returns the loss on batch ``i`` without
calling backward (the package's closure convention); ``shard=(rank, world)`` selects that rank's
equal slice of the batch, so the mean over ranks of the shard losses is the full-batch loss.
Hyperparameters are chosen so that ``resume_steps`` lands somewhere interesting: mid-epoch for
Natasha, between Hessian refreshes for AdaHessian (``update_each=2``), before/after the hybrid
switch, after K-FAC inverse refreshes (``inv_every=2``), across trust-region radius changes.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import natasha_ext.optim as O

IN, HIDDEN, OUT, BATCH, N_BATCHES = 5, 8, 3, 16, 6


def loss_fn(name: str) -> Callable:
    """The zoo's regression loss: 'mse' (F.mse_loss) or 'squares', the same mean written out,
    whose backward has working forward-mode derivatives (torch 2.x's mse_loss_backward has none)."""
    return F.mse_loss if name == "mse" else (lambda a, b: (a - b).pow(2).mean())


class Problem:
    """A tiny regression problem with fixed batches (deterministic for a given seed)."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.seed, self.dtype, self.device = seed, dtype, device
        self.X = torch.randn(N_BATCHES, BATCH, IN, generator=g, dtype=torch.float64)
        w = torch.randn(IN, OUT, generator=g, dtype=torch.float64)
        self.Y = torch.tanh(self.X @ w) + 0.1 * torch.randn(N_BATCHES, BATCH, OUT, generator=g, dtype=torch.float64)
        self.X, self.Y = self.X.to(device, dtype), self.Y.to(device, dtype)

    def model(self, init_seed: int = 0) -> nn.Module:
        torch.manual_seed(init_seed)
        return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).to(self.device, self.dtype)

    def batch(self, i: int, shard: Optional[Tuple[int, int]] = None):
        x, y = self.X[i % N_BATCHES], self.Y[i % N_BATCHES]
        if shard is not None:
            r, n = shard
            k = BATCH // n
            x, y = x[r * k:(r + 1) * k], y[r * k:(r + 1) * k]
        return x, y

    def closure(self, model: nn.Module, i: int, shard=None, outputs: bool = False, autocast=None, loss: str = "mse"):
        """``loss``: 'mse' (F.mse_loss) or 'squares', the same mean written out, whose backward
        has working forward-mode derivatives (torch 2.x's mse_loss_backward has none)."""
        x, y = self.batch(i, shard)
        mse = loss_fn(loss)

        def closure():
            if autocast is not None:
                with torch.autocast(autocast[0], dtype=autocast[1]):
                    out = model(x.to(autocast[1]))
                out = out.float()
                value = mse(out, y.float())
            else:
                out = model(x)
                value = mse(out, y)
            return (value, out) if outputs else value

        return closure

    def full_loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(F.mse_loss(model(self.X[i]), self.Y[i]) for i in range(N_BATCHES)) / N_BATCHES)


@dataclasses.dataclass
class Case:
    name: str
    cls: str                                   # attribute of natasha_ext.optim
    kwargs: Dict[str, Any]
    takes_model: bool = False                  # K-FAC family: the model (or params + model=)
    resume_steps: int = 3                      # N of the 2N == N + save/load + N test
    group_key: Optional[str] = "lr"            # a hyperparameter read per param group
    group_value: Any = None                    # value for the second group (default: 2x)
    lr_key: Optional[str] = "lr"               # LR schedulers apply (None: no lr)
    outputs: bool = False                      # closure returns (loss, outputs)
    before_step: Optional[Callable[[Any, int], None]] = None   # training-loop hook (e.g. validation report)
    bad: Sequence[Tuple[str, Any]] = ()        # (kwarg, invalid value) -> ValueError/TypeError naming kwarg
    uses_hvp: bool = True                      # draws HVPs (the HVP fuzz applies)
    distributed: Any = True                    # True, or a reason string why 2 ranks != 1 process
    loss: str = "mse"                          # Problem.closure's loss ('squares': forward-mode friendly)
    notes: str = ""

    @property
    def package_closure_only(self) -> bool:
        """The engine differentiates the closure's loss itself (a closure calling backward is refused)."""
        return self.kwargs.get("hvp") in ("exact", "forward_over_reverse")

    @property
    def klass(self):
        return getattr(O, self.cls)

    def make(self, model: nn.Module, params=None, **overrides):
        kw = dict(self.kwargs)
        kw.update(overrides)
        if self.takes_model:
            if params is None:
                return self.klass(model, **kw)
            return self.klass(params, model=model, **kw)
        return self.klass(model.parameters() if params is None else params, **kw)

    def closure(self, problem: Problem, model, i, shard=None, autocast=None):
        return problem.closure(model, i, shard=shard, outputs=self.outputs, autocast=autocast, loss=self.loss)

    def run(self, problem: Problem, model, opt, start: int, stop: int, shard=None, autocast=None):
        """Training loop: one step(closure) per batch i in [start, stop)."""
        losses = []
        for i in range(start, stop):
            if self.before_step is not None:
                self.before_step(opt, i)
            losses.append(opt.step(self.closure(problem, model, i, shard, autocast)))
        return losses

    def __repr__(self):
        return self.name


def _switch_at(k: int):
    """Hybrid: report a validation loss below the threshold before step k (the switch)."""
    def hook(opt, i):
        opt.report_validation_loss(0.5 if i >= k else 2.0)
    return hook


_COMMON_BAD = [("lr", -1.0), ("lr", float("nan"))]
_ADA_BAD = _COMMON_BAD + [("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("eps", 0.0), ("eps", -1e-8),
                          ("hessian_power", 0.0), ("hessian_power", 1.5), ("update_each", 0), ("n_samples", 0),
                          ("hvp", "magic"), ("weight_decay", -0.1), ("fd_eps", 0.0)]
_NAT_BAD = [("lr", -1.0), ("lr", float("nan")), ("sigma", -0.5), ("epoch_size", 0), ("subepochs", 0),
            ("epoch_size", 5)]
# the zoo's problem is MSE regression; deterministic Fisher types, so that N ranks equal one process
# ('mc' draws per rank; it is tested in tests/optim/test_kfac_fisher.py)
_KFAC_TYPE2 = dict(fisher="type2", likelihood="gaussian")
_KFAC_BAD = [("lr", -1.0), ("lr", float("nan")), ("momentum", 1.0), ("momentum", -0.1), ("damping", 0.0),
             ("damping", -1e-3), ("stat_decay", 1.0), ("weight_decay", -1.0), ("kl_clip", -1.0), ("cov_every", 0),
             ("inv_every", 0), ("inverse", "lu")]
_TR_BAD = [("radius", 0.0), ("radius", -1.0), ("radius", float("nan")), ("eta", 0.0), ("eta", 1.0), ("gamma", 1.0),
           ("gamma", 0.5), ("max_radius", 1e-9), ("norm", "l7"), ("beta", 1.0), ("eps", 0.0), ("cg_max_iters", 0),
           ("cg_tol", 0.0), ("curvature", "fisher"), ("hvp", "magic"), ("eta_very_successful", 0.001),
           ("max_radius", float("nan"))]

_ARC_BAD = [("sigma", 0.0), ("sigma", -1.0), ("sigma", float("nan")), ("eta1", 0.0), ("eta1", 1.0), ("eta2", 1.5),
            ("gamma", 1.0), ("subproblem", "qr"), ("norm", "l7"), ("subproblem_max_iters", 0), ("norm_scale", "l2")]

ZOO: List[Case] = [
    Case("natasha15", "Natasha15", dict(lr=0.05, sigma=0.5, epoch_size=6, subepochs=2, snapshot_batches=1, seed=11),
         group_key="sigma", bad=_NAT_BAD + [("snapshot_batches", 0)], uses_hvp=False,
         notes="m = 3, mu from 1 minibatch: an epoch is 4 calls, N = 3 lands in the 2nd sub-epoch"),
    Case("natasha15_default_mu", "Natasha15", dict(lr=0.05, sigma=0.5, epoch_size=3, subepochs=1, seed=15),
         uses_hvp=False, resume_steps=2, notes="mu from B = 3 minibatches: N = 2 resumes inside the snapshot phase"),
    Case("natasha15_simplified", "Natasha15",
         dict(lr=0.05, sigma=0.5, epoch_size=6, subepochs=3, variance_reduction=False, seed=12),
         uses_hvp=False, resume_steps=2),
    Case("natasha2", "Natasha2", dict(lr=0.05, sigma=0.5, epoch_size=4, subepochs=2, delta=0.2, eta=0.1,
                                      oja_iters=4, snapshot_batches=1, seed=13),
         group_key=None, bad=_NAT_BAD + [("delta", 0.0), ("eta", -0.1), ("L2", 0.0), ("hvp", "magic"),
                                         ("variant", "fast"), ("oja_iters", 0), ("kick_test_batches", -1),
                                         ("eta_check", "ignore")],
         notes="faithful variant: one lr/sigma for all groups (closed-form F^k prox); Oja call, then the kick "
               "test on the next minibatch, which (no kick) takes the first step with mu from it"),
    Case("natasha2_simplified_fd", "Natasha2",
         dict(lr=0.05, sigma=0.5, epoch_size=4, subepochs=2, delta=0.2, eta=0.1, oja_iters=3,
              hvp="finite_difference", variant="simplified", seed=14)),
    Case("adahessian", "AdaHessian", dict(lr=0.05, update_each=2, seed=21), bad=_ADA_BAD,
         notes="update_each=2: N = 3 resumes between Hessian refreshes"),
    Case("adahessian_fd", "AdaHessian", dict(lr=0.05, hvp="finite_difference", n_samples=2, weight_decay=1e-2,
                                              abs_before_average=True, seed=22),
         notes="the released code's mean |D| (AdaHessian.practical)"),
    Case("adahessian_forward_over_reverse", "AdaHessian",
         dict(lr=0.05, hvp="forward_over_reverse", update_each=2, weight_decay=1e-2, seed=25),
         bad=_ADA_BAD + [("n_samples", 2)], loss="squares",
         notes="the probe as the closure's forward-mode tangent (Pearlmutter's R-operator)"),
    Case("hybrid_switch_before", "HybridSGDAdaHessian",
         dict(switch_threshold=1.0, sgd_lr=0.05, momentum=0.9, lr=0.05, seed=23),
         before_step=_switch_at(1),
         bad=_ADA_BAD + [("sgd_lr", -0.1), ("momentum", 1.0), ("sgd_momentum_form", "adam")],
         notes="switches to AdaHessian before the checkpoint"),
    Case("hybrid_switch_after", "HybridSGDAdaHessian",
         dict(switch_threshold=1.0, sgd_lr=0.05, momentum=0.9, lr=0.05, sgd_momentum_form="paper", seed=24),
         before_step=_switch_at(4), group_key="sgd_lr",
         notes="SGD phase (eq. 2's form) at the checkpoint, switch after it"),
    Case("kfac", "KFAC", dict(lr=0.05, damping=0.1, cov_every=1, inv_every=2, seed=31, **_KFAC_TYPE2), takes_model=True, bad=_KFAC_BAD,
         notes="inverses refreshed at steps 0 and 2: N = 3 resumes after a refresh"),
    Case("kfac_eigh", "KFAC", dict(lr=0.02, damping=0.3, cov_every=2, inv_every=3, inverse="eigh",
                                   kl_clip=None, weight_decay=1e-3, seed=32, fisher="empirical"), takes_model=True, resume_steps=4),
    Case("ekfac", "EKFAC", dict(lr=0.05, damping=0.1, inv_every=2, seed=36), takes_model=True,
         bad=[b for b in _KFAC_BAD if b[0] != "inverse"],
         notes="eigenbasis refreshed at steps 0 and 2, s* updated every step: N = 3 resumes after a refresh"),
    # ang / ifang: the K-FAC practice (EMA, momentum, KL clip of the step taken); ang_paper: the defaults
    Case("ang", "ANG", dict(lr=0.05, damping=0.1, stat_decay=0.95, cov_every=1, inv_every=2, momentum=0.9,
                            kl_clip=1e-3, total_steps=8, seed=33, **_KFAC_TYPE2), takes_model=True,
         bad=[("lam_schedule", "sqrt"), ("total_steps", 0), ("damping", 0.0)]),
    Case("ang_paper", "ANG", dict(lr=0.02, total_steps=8, seed=36, **_KFAC_TYPE2), takes_model=True,
         bad=[("factor_damping", 0.0), ("momentum", 1.0)], notes="Tang et al.'s Alg. 2: factors of each minibatch"),
    Case("ifang", "IFANG", dict(lr=0.05, damping=0.1, rank=1, momentum=0.9, kl_clip=1e-3, total_steps=8, seed=34, **_KFAC_TYPE2),
         takes_model=True, bad=[("rank", 0), ("damping", -1.0), ("lr", float("nan"))]),
    Case("ifang_rank2", "IFANG", dict(lr=0.05, damping=0.1, rank=2, momentum=0.9, kl_clip=1e-3, total_steps=6,
                                      lam_schedule="exp", seed=35,
                                      fisher="empirical"), takes_model=True),
    Case("trust_region", "TrustRegion", dict(radius=0.05, cg_max_iters=5, seed=41), group_key="eps",
         group_value=1e-6, lr_key=None, bad=_TR_BAD,
         notes="radius grows/shrinks with rho across the checkpoint"),
    Case("trust_region_spherical_fd", "TrustRegion",
         dict(radius=0.5, norm="spherical", hvp="finite_difference", cg_max_iters=4, eta=0.2, seed=42),
         group_key=None, lr_key=None),
    Case("trust_region_gauss_newton", "TrustRegion",
         dict(radius=0.05, norm="adagrad", curvature="gauss_newton", cg_max_iters=5, seed=43),
         group_key="eps", group_value=1e-3, lr_key=None, outputs=True),
    Case("arc", "ARC", dict(sigma=3.0, eps=0.1, subproblem_max_iters=5, seed=51), group_key="eps", group_value=1e-6,
         lr_key=None, bad=_ARC_BAD),
    Case("arc_initial_mean", "ARC",
         dict(sigma=3.0, eps=0.1, subproblem_max_iters=5, norm_scale="initial_mean", seed=53),
         group_key=None, lr_key=None, notes="ARC.practical's cubic term in A / mean(a_0)"),
    Case("arc_cg", "ARC", dict(sigma=1.0, subproblem="cg", subproblem_max_iters=5, norm="spherical", seed=52),
         group_key=None, lr_key=None),
]

ZOO_BY_NAME = {c.name: c for c in ZOO}


def case_params(cases=None):
    """pytest parametrisation over the zoo (ids = case names)."""
    import pytest

    return pytest.mark.parametrize("case", list(ZOO if cases is None else cases), ids=lambda c: c.name)


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def state_tensors(opt) -> List[torch.Tensor]:
    """Every tensor of the optimizer's per-parameter state and extra state."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(dict(opt.state))
    walk(opt.extra_state())
    return out


def roundtrip(obj):
    """``obj`` through torch.save / torch.load(weights_only=True), as a checkpoint travels."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def resumed_run(case, pb: "Problem", n: int, *, init_seed: int, opt_seed: int, after_load=None):
    """The resume experiment: 2n steps straight (reference) and n steps + a weights_only checkpoint
    into a FRESH model and optimizer (model init ``init_seed``, optimizer seed ``opt_seed``) + n
    steps. ``after_load(model, opt)`` runs right after the load. Returns (m_ref, o_ref, m2, o2)."""
    m_ref = pb.model()
    o_ref = case.make(m_ref)
    case.run(pb, m_ref, o_ref, 0, 2 * n)
    m1 = pb.model()
    o1 = case.make(m1)
    case.run(pb, m1, o1, 0, n)
    ckpt = roundtrip({"model": m1.state_dict(), "optim": o1.state_dict()})
    del m1, o1
    m2 = pb.model(init_seed=init_seed)
    o2 = case.make(m2, seed=opt_seed)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["optim"])
    if after_load is not None:
        after_load(m2, o2)
    case.run(pb, m2, o2, n, 2 * n)
    return m_ref, o_ref, m2, o2
