"""The optimizers the training program (``python -m natasha_ext.train``) knows: one entry each.

Adding an optimizer is one entry in :data:`OPTIMIZERS`::

    "adahessian": OptimizerSpec(
        help="AdaHessian (Yao et al.); defaults: AdaHessian/Hybrid paper, Table I",
        flags={"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "hessian_power": Flag(1.0, "Hessian power k")},
        build=lambda model, params, a: AdaHessian(params, lr=a.lr, betas=(a.beta1, a.beta2),
                                                  hessian_power=a.hessian_power, seed=a.seed),
        closure="loss"),

* ``flags``: hyperparameter name -> default (or :class:`Flag` for help/type/choices). Each name
  becomes ``--name`` (underscores -> dashes). A name shared by several optimizers (``lr``,
  ``beta1`` ...) is one flag whose default depends on the optimizer chosen; a bool default gives
  ``--name/--no-name``.
* ``build(model, params, args)``: ``args`` is the parsed namespace with this optimizer's flags
  resolved (plus ``seed``, ``device`` ...); ``model`` is there for optimizers that hook layers
  (K-FAC).
* ``closure``: ``"loss"`` — this package's second-order convention, ``step(closure)`` where
  ``closure()`` returns the minibatch loss *without* calling backward (the optimizer
  differentiates); ``"backward"`` — a ``torch.optim`` optimizer whose closure zeroes the grads,
  calls ``backward()`` and returns the loss.
* ``epoch_start`` / ``epoch_end``: optional hooks ``f(optimizer, ctx)`` (``ctx`` is the trainer's
  :class:`~natasha_ext.train.EpochContext`: model, loss function, training tensors, metrics of
  the epoch so far — e.g. the Hybrid switch reads ``ctx.metrics['val_loss']``, an SVRG method
  computes its snapshot gradient from ``ctx.full_batches()``).

Only implemented optimizers are listed; the CLI's ``--optimizer`` choices are this dict's keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = ["Flag", "OptimizerSpec", "OPTIMIZERS", "get_spec", "flag_table", "flag_type"]


@dataclass(frozen=True)
class Flag:
    """One hyperparameter flag: default, help text, optional type/choices (type defaults to the
    default's type)."""
    default: Any
    help: str = ""
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[Any]] = None


@dataclass(frozen=True)
class OptimizerSpec:
    build: Callable[[torch.nn.Module, list, Any], torch.optim.Optimizer]
    flags: Dict[str, Any] = field(default_factory=dict)
    closure: str = "backward"          # "backward" (torch.optim) or "loss" (second-order convention)
    help: str = ""
    epoch_start: Optional[Callable[[torch.optim.Optimizer, Any], None]] = None
    epoch_end: Optional[Callable[[torch.optim.Optimizer, Any], None]] = None

    def __post_init__(self):
        if self.closure not in ("backward", "loss"):
            raise ValueError(f"closure must be 'backward' or 'loss', got {self.closure!r}")

    def flag(self, name: str) -> Flag:
        f = self.flags[name]
        return f if isinstance(f, Flag) else Flag(f)


_BETAS = {"beta1": Flag(0.9, "first-moment decay"), "beta2": Flag(0.999, "second-moment decay")}

# ---- K-FAC / ANG / IFANG helpers (natasha_ext.optim.kfac) ------------------------------------
_KFAC_FLAGS = {
    "lr": Flag(0.01, "learning rate"), "momentum": 0.9,
    # 0.03, not the class default 1e-3: with cov_every 10 / inv_every 100 the stale early inverses
    # made 1e-3 diverge on LeNet-5/MNIST within 2 epochs (K-FAC and ANG); 0.03 trains both (97 %/95 %).
    "damping": Flag(3e-2, "K-FAC damping gamma of (A (x) G + gamma I); sqrt(gamma) per factor (eq. 8)"),
    "stat_decay": Flag(0.95, "K-FAC: EMA decay of the factors"), "weight_decay": 0.0,
    "kl_clip": Flag(1e-3, "K-FAC KL clipping (0 disables)"),
    "cov_every": Flag(10, "steps between statistics refreshes"),
    "inv_every": Flag(100, "K-FAC: steps between inverse refreshes"),
    "inverse": Flag("cholesky", "K-FAC damped inverse", choices=("cholesky", "eigh")),
}
_ANG_FLAGS = {
    "lam_schedule": Flag("linear", "ANG lambda strategy (0 = natural gradient -> 1 = Euclidean)",
                         choices=("linear", "exp", "cosine")),
    "total_steps": Flag(0, "ANG: steps over which lambda reaches 1 (0: the whole run)"),
}


def _kfac_build(kind: str, model, a):
    from natasha_ext import data
    from natasha_ext.optim import ANG, IFANG, KFAC

    kw = dict(lr=a.lr, momentum=a.momentum, damping=a.damping, weight_decay=a.weight_decay,
              kl_clip=a.kl_clip or None, cov_every=a.cov_every)
    if kind != "ifang":
        kw.update(stat_decay=a.stat_decay, inv_every=a.inv_every, inverse=a.inverse)
    if kind == "kfac":
        return KFAC(model, **kw)
    total = a.total_steps
    if not total:
        n_train, n_val, _ = data.parse_subset(getattr(a, "subset", "1200/200/200"))
        n_train = n_train if n_train is not None else 60000 - n_val
        total = a.epochs * -(-n_train // a.batch_size)
    kw.update(lam_schedule=a.lam_schedule, total_steps=total)
    return IFANG(model, rank=a.rank, **kw) if kind == "ifang" else ANG(model, **kw)


# ---- trust region / ARC: flags both take (norm of the region, curvature, HVP engine)
_TR_COMMON = {
    "norm": Flag("rmsprop", "TR/ARC: shape A of the region (eq. 3 RMSProp, eq. 2 Adagrad, or A = I)",
                 choices=("rmsprop", "adagrad", "spherical")),
    "beta": Flag(0.8, "TR/ARC: RMSProp decay of the ellipsoid (eq. 3)"),
    "eps": Flag(1e-8, "TR/ARC: epsilon added to the ellipsoid diagonal"),
    "gamma": Flag(2.0, "TR/ARC: radius / sigma factor (> 1)"),
    "curvature": Flag("hessian", "TR/ARC: B = Hessian or generalised Gauss-Newton",
                      choices=("hessian", "gauss_newton")),
    "hvp": Flag("exact", "Hessian-vector products", choices=("exact", "finite_difference")),
    "fd_eps": Flag(1e-4, "finite-difference HVP step q"),
}

# ---- AdaHessian / Hybrid helpers (natasha_ext.optim.adahessian) -------------------------------
_ADAHESSIAN_FLAGS = {
    "eps": Flag(1e-4, "denominator epsilon"), "weight_decay": Flag(0.0, "decoupled weight decay"),
    "hessian_power": Flag(1.0, "AdaHessian: Hessian power k"),
    "update_each": Flag(1, "AdaHessian: steps between Hessian-diagonal refreshes"),
    "n_samples": Flag(1, "AdaHessian: Hutchinson probes per refresh"),
    "block_size": Flag(0, "AdaHessian: block average b of 1-D/2-D tensors (eq. 9; 0: none)"),
    "hvp": Flag("exact", "Hessian-vector products", choices=("exact", "finite_difference")),
    "fd_eps": Flag(1e-4, "finite-difference HVP step q"),
}


def _adahessian():
    from natasha_ext.optim import adahessian

    return adahessian


def _adahessian_kw(a) -> dict:
    return dict(betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay, hessian_power=a.hessian_power,
                update_each=a.update_each, n_samples=a.n_samples, block_size=a.block_size or None, hvp=a.hvp,
                fd_eps=a.fd_eps, seed=a.seed)


def _hybrid_epoch_end(opt, ctx) -> None:
    """The Hybrid's switch test: report the epoch's validation loss (the training loss when the
    run has no validation set)."""
    loss = ctx.metrics.get("val_loss", float("nan"))
    if loss != loss:
        loss = ctx.metrics.get("train_loss", float("nan"))
    opt.report_validation_loss(loss, epoch=ctx.epoch)


# Defaults of the first-order baselines: the AdaHessian/Hybrid paper's grid-searched values
# (ResNet-18, 1200 MNIST images, batch 100, 15 epochs).
OPTIMIZERS: Dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        help="plain SGD (torch.optim.SGD); lr 0.01 as in the AdaHessian/Hybrid paper",
        flags={"lr": Flag(0.01, "learning rate"), "weight_decay": Flag(0.0, "L2 weight decay")},
        build=lambda model, params, a: torch.optim.SGD(params, lr=a.lr, weight_decay=a.weight_decay)),
    "sgd-momentum": OptimizerSpec(
        help="SGD with heavy-ball momentum (torch.optim.SGD); lr 0.005, momentum 0.9 (AdaHessian/Hybrid paper)",
        flags={"lr": 0.005, "momentum": Flag(0.9, "momentum"), "nesterov": Flag(False, "Nesterov momentum"),
               "weight_decay": 0.0},
        build=lambda model, params, a: torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, nesterov=a.nesterov,
                                                       weight_decay=a.weight_decay)),
    "adam": OptimizerSpec(
        help="Adam (torch.optim.Adam); lr 0.001, betas (0.9, 0.999) (AdaHessian/Hybrid paper)",
        flags={"lr": 0.001, **_BETAS, "eps": Flag(1e-8, "denominator epsilon"), "weight_decay": 0.0},
        build=lambda model, params, a: torch.optim.Adam(params, lr=a.lr, betas=(a.beta1, a.beta2), eps=a.eps,
                                                        weight_decay=a.weight_decay)),
    # ---- adahessian (AdaHessian / Hybrid; defaults: adahessian-hybrid-resnet18-mnist.md, Table I)
    "adahessian": OptimizerSpec(
        help="AdaHessian (Yao et al. 2020): Hutchinson diagonal (fused kernel), conv-kernel spatial averaging, "
             "Hessian power; lr 0.1, betas (0.9, 0.999) (AdaHessian/Hybrid paper)",
        flags={"lr": 0.1, **_BETAS, **_ADAHESSIAN_FLAGS},
        build=lambda model, params, a: _adahessian().AdaHessian(params, lr=a.lr, **_adahessian_kw(a)),
        closure="loss"),
    "hybrid": OptimizerSpec(
        help="Hybrid (AdaHessian/Hybrid paper): SGD-momentum (lr 0.005, momentum 0.9) until the validation loss "
             "falls below tl = 1.0, then AdaHessian (lr 0.001, betas (0.9, 0.999))",
        flags={"lr": 0.001, **_BETAS, **_ADAHESSIAN_FLAGS,
               "switch_threshold": Flag(1.0, "Hybrid: validation loss tl below which AdaHessian takes over"),
               "sgd_lr": Flag(0.005, "Hybrid: learning rate of the SGD-momentum phase"), "momentum": 0.9},
        build=lambda model, params, a: _adahessian().HybridSGDAdaHessian(
            params, switch_threshold=a.switch_threshold, sgd_lr=a.sgd_lr, momentum=a.momentum, lr=a.lr,
            **_adahessian_kw(a)),
        closure="loss", epoch_end=lambda opt, ctx: _hybrid_epoch_end(opt, ctx)),
    # ---- natasha (Natasha1.5 / Natasha2; defaults: natasha2-pytorch-report appendix, LeNet/MNIST)
    "natasha15": OptimizerSpec(
        help="Natasha1.5 (Allen-Zhu 2018): SVRG epochs, sub-epoch averaging; alpha 0.01, B 27, p 9, sigma 0.5 "
             "(report appendix); --no-variance-reduction = the report's simplified Alg. 2",
        flags={"lr": 0.01, "sigma": Flag(0.5, "Natasha regulariser weight sigma"),
               "epoch_size": Flag(27, "Natasha epoch length B (inner steps)"),
               "subepochs": Flag(9, "Natasha sub-epochs p (m = B/p)"),
               "variance_reduction": Flag(True, "Natasha1.5: faithful variance-reduced estimator"),
               "snapshot_batches": Flag(0, "Natasha: minibatches averaged into mu per epoch (0: the first one)")},
        build=lambda model, params, a: _natasha().Natasha15(
            params, lr=a.lr, sigma=a.sigma, epoch_size=a.epoch_size, subepochs=a.subepochs,
            variance_reduction=a.variance_reduction, snapshot_batches=a.snapshot_batches or None, seed=a.seed),
        closure="loss"),
    "natasha2": OptimizerSpec(
        help="Natasha2 (Allen-Zhu 2018): Oja's algorithm on I - eta H, kick along negative curvature, else a "
             "Natasha1.5 epoch; --hvp exact|finite_difference, --variant faithful|simplified (report Alg. 3-4)",
        flags={"lr": 0.01, "sigma": Flag(0.5, "Natasha regulariser weight sigma"),
               "epoch_size": Flag(27, "Natasha epoch length B (inner steps)"),
               "subepochs": Flag(9, "Natasha sub-epochs p (m = B/p)"),
               "snapshot_batches": Flag(0, "Natasha: minibatches averaged into mu per epoch (0: the first one)"),
               "delta": Flag(0.2, "Natasha2 curvature threshold delta (kick if v'Hv <= -delta/2)"),
               "oja_eta": Flag(0.01, "Natasha2 Oja step eta (power method on I - eta H)"),
               "oja_iters": Flag(0, "Natasha2 Oja iterations (0: ceil(1/delta^2), capped at 1000)"),
               "hvp": Flag("exact", "Hessian-vector products", choices=("exact", "finite_difference")),
               "fd_eps": Flag(1e-4, "finite-difference HVP step q"),
               "variant": Flag("faithful", "Natasha2 variant", choices=("faithful", "simplified"))},
        build=lambda model, params, a: _natasha().Natasha2(
            params, lr=a.lr, sigma=a.sigma, epoch_size=a.epoch_size, subepochs=a.subepochs, delta=a.delta,
            eta=a.oja_eta, oja_iters=a.oja_iters or None, hvp=a.hvp, fd_eps=a.fd_eps, variant=a.variant,
            snapshot_batches=a.snapshot_batches or None, seed=a.seed),
        closure="loss"),
    # K-FAC / ANG / IFANG (asymptotic-natural-gradient.md): these hook the model's Linear/Conv2d
    # layers, so build() passes the model; closure="loss" (the optimizer differentiates).
    "kfac": OptimizerSpec(
        help="K-FAC (Martens & Grosse): EMA Kronecker factors, damped inverses, KL clip, momentum",
        flags=_KFAC_FLAGS,
        build=lambda model, params, a: _kfac_build("kfac", model, a),
        closure="loss"),
    "ang": OptimizerSpec(
        help="Asymptotic natural gradient (Tang et al., eq. 7): K-FAC slerped toward the Euclidean gradient",
        flags={**_KFAC_FLAGS, **_ANG_FLAGS},
        build=lambda model, params, a: _kfac_build("ang", model, a),
        closure="loss"),
    "ifang": OptimizerSpec(
        help="Inverse-free ANG (eqs. 9-14): rank-s' group-mean factors applied by Sherman-Morrison-Woodbury",
        flags={**{k: v for k, v in _KFAC_FLAGS.items() if k not in ("stat_decay", "inv_every", "inverse")},
               "cov_every": Flag(1, "steps between statistics refreshes"),
               "damping": Flag(1e-1, "IFANG damping gamma (sqrt(gamma) per low-rank factor; see optim.IFANG); "
                                  "1e-2 diverged on LeNet-5/MNIST after 3 epochs"),
               **_ANG_FLAGS,
               "rank": Flag(1, "IFANG: number s' of row groups (rank of the factors)")},
        build=lambda model, params, a: _kfac_build("ifang", model, a),
        closure="loss"),
    # ---- trust region / ARC (ellipsoidal-trust-region.md, Alg. 1; defaults: natasha_ext.optim.TrustRegion/ARC)
    "trust-region": OptimizerSpec(
        help="stochastic trust region (Alg. 1), Steihaug CG in the ellipsoidal RMSProp norm (eq. 3); "
             "--norm spherical = A = I; radius 1e-4, eta 0.01, gamma 2, beta 0.8, CG 50 its / tol 0.1",
        flags={**_TR_COMMON,
               "radius": Flag(1e-4, "TR: initial radius Delta_0 (A-norm)"),
               "max_radius": Flag(10.0, "TR: radius cap"),
               "eta": Flag(0.01, "TR: acceptance threshold on rho"),
               "eta_very_successful": Flag(0.95, "TR: rho above which the radius grows by gamma"),
               "cg_max_iters": Flag(50, "TR: Steihaug-CG iterations (curvature products) per step"),
               "cg_tol": Flag(0.1, "TR: relative residual stopping CG")},
        build=lambda model, params, a: _tr().TrustRegion(
            params, radius=a.radius, max_radius=a.max_radius, eta=a.eta, eta_very_successful=a.eta_very_successful,
            gamma=a.gamma, norm=a.norm, beta=a.beta, eps=a.eps, cg_max_iters=a.cg_max_iters, cg_tol=a.cg_tol,
            curvature=a.curvature, hvp=a.hvp, fd_eps=a.fd_eps, seed=a.seed, model=model),
        closure="loss"),
    "arc": OptimizerSpec(
        help="adaptive cubic regularisation (Cartis et al. 2011) in the same adaptive norms, Lanczos + secular "
             "equation (or --subproblem cg); sigma 1, eta1 0.1, eta2 0.9, gamma 2, 25 Krylov its / tol 0.1",
        flags={**_TR_COMMON,
               "sigma": Flag(1.0, "ARC: initial cubic regularisation sigma"),
               "eta1": Flag(0.1, "ARC: acceptance threshold on rho"),
               "eta2": Flag(0.9, "ARC: rho above which sigma shrinks by gamma"),
               "subproblem": Flag("lanczos", "ARC subproblem solver", choices=("lanczos", "cg")),
               "subproblem_max_iters": Flag(25, "ARC: Krylov dimension / CG iterations per step"),
               "subproblem_tol": Flag(0.1, "ARC: relative model-gradient tolerance")},
        build=lambda model, params, a: _tr().ARC(
            params, sigma=a.sigma, eta1=a.eta1, eta2=a.eta2, gamma=a.gamma, norm=a.norm, subproblem=a.subproblem,
            beta=a.beta, eps=a.eps, subproblem_max_iters=a.subproblem_max_iters, subproblem_tol=a.subproblem_tol,
            curvature=a.curvature, hvp=a.hvp, fd_eps=a.fd_eps, seed=a.seed, model=model),
        closure="loss"),
}


def _tr():
    from natasha_ext.optim import trust_region

    return trust_region


def _natasha():
    from natasha_ext.optim import natasha

    return natasha


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def flag_table() -> Dict[str, Dict[str, Flag]]:
    """flag name -> {optimizer name -> Flag}: which optimizers use each flag, with their defaults.
    Raises if two optimizers give one flag different types (the flag could not parse both)."""
    table: Dict[str, Dict[str, Flag]] = {}
    for opt_name, spec in OPTIMIZERS.items():
        for flag_name in spec.flags:
            table.setdefault(flag_name, {})[opt_name] = spec.flag(flag_name)
    for flag_name, per_opt in table.items():
        kinds = {_flag_type(f) for f in per_opt.values()}
        if kinds == {int, float}:      # 1 and 0.5 are both fine for a float flag
            kinds = {float}
        if len(kinds) > 1:
            raise TypeError(f"flag --{flag_name.replace('_', '-')} has different types across optimizers "
                            f"{sorted(per_opt)}: {kinds}; give it one type (or rename it)")
    return table


def flag_type(name: str) -> Callable[[str], Any]:
    """The type one flag parses to (float wins over int when optimizers mix them)."""
    kinds = {_flag_type(f) for f in flag_table()[name].values()}
    return float if kinds == {int, float} else kinds.pop()


def _flag_type(f: Flag):
    if f.type is not None:
        return f.type
    if isinstance(f.default, bool):
        return bool
    if isinstance(f.default, float):
        return float
    if isinstance(f.default, int):
        return int
    return str if f.default is None else type(f.default)
