"""The optimizers the training program (``python -m natasha_ext.train``) knows: one registry.

Each entry of :data:`OPTIMIZERS` names an optimizer class and the constructor arguments the CLI
exposes, one :class:`Flag` each::

    "adahessian": OptimizerSpec(
        cls=AdaHessian, closure="loss", help="AdaHessian (Yao et al. 2021) ...",
        flags={"lr": Flag("learning rate", default=0.1, why="the AdaHessian/Hybrid paper's value"),
               "beta1": Flag("first-moment decay", arg="betas", index=0), ...})

* A flag's default is the class's own default, read from its constructor's signature. An entry
  that wants another one states it *and why* (``default=..., why=...``); those differences are
  the table :func:`defaults_table` prints (``--help`` shows it; ``python -m
  natasha_ext.cli_optimizers`` prints it as markdown).
* ``arg``/``index`` map a flag to its constructor argument (``--beta1`` -> ``betas[0]``,
  ``--oja-eta`` -> ``eta``); ``none=0`` says that the CLI value 0 stands for the argument's
  ``None`` ("none" / "the default rule").
* The choices of string flags are the constants the optimizer modules export (``NORMS``,
  ``CURVATURES``, ``HVP_METHODS``, ``LAMBDA_SCHEDULES``); every other value is checked by the
  class itself: :func:`check_hyperparameters` builds the optimizer on a tiny probe model, so a
  bad value is reported against its flag before any training starts.
* A flag name shared by several optimizers (``lr``, ``beta1`` ...) is one flag whose default
  depends on the optimizer chosen; a bool gives ``--name/--no-name``.
* ``closure``: ``"loss"`` - this package's second-order convention, ``step(closure)`` where
  ``closure()`` returns the minibatch loss *without* calling backward (the optimizer
  differentiates); ``"backward"`` - a ``torch.optim`` optimizer whose closure zeroes the grads,
  calls ``backward()`` and returns the loss.
* ``epoch_start`` / ``epoch_end``: optional hooks ``f(optimizer, ctx)`` (``ctx`` is the trainer's
  :class:`~natasha_ext.training.loop.EpochContext`: model, loss function, training tensors,
  metrics of the epoch so far - the Hybrid switch reads ``ctx.metrics['val_loss']``).

The CLI's ``--optimizer`` choices are this dict's keys.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from natasha_ext import data
from natasha_ext.curvature.hvp import HVP_METHODS, ONE_PROBE_HVP_METHODS
from natasha_ext.optim import ANG, ARC, EKFAC, IFANG, KFAC, AdaHessian, HybridSGDAdaHessian, Natasha2, Natasha15, TrustRegion
from natasha_ext.optim.adahessian import SGD_MOMENTUM_FORMS
from natasha_ext.curvature.fisher import FISHER_TYPES, LIKELIHOODS
from natasha_ext.optim.kfac import LAMBDA_SCHEDULES
from natasha_ext.optim.natasha import ETA_CHECKS
from natasha_ext.optim.trust_region import CURVATURES, NORM_SCALES, NORMS

__all__ = ["Flag", "OptimizerSpec", "OPTIMIZERS", "get_spec", "flag_table", "flag_type", "class_default",
           "defaults_table", "check_hyperparameters"]

_CLASS = object()        # "the class's own default"
_NONE = object()         # no CLI value stands for None


@dataclass(frozen=True)
class Flag:
    """One hyperparameter flag of one optimizer.

    help: the --help text; arg/index: the constructor argument (default: the flag's name) and,
    for a tuple argument, the position in it; default/why: a CLI default other than the class's
    and the reason; none: the CLI value meaning the argument's None; choices: allowed values;
    type: the parser type (default: the default's type)."""
    help: str = ""
    arg: Optional[str] = None
    index: Optional[int] = None
    default: Any = _CLASS
    why: str = ""
    none: Any = _NONE
    choices: Optional[Sequence[Any]] = None
    type: Optional[Callable[[str], Any]] = None

    def __post_init__(self):
        if (self.default is _CLASS) != (not self.why):
            raise ValueError("a Flag states a CLI default exactly when it says why it differs from the class's")


@dataclass(frozen=True)
class OptimizerSpec:
    """One registered optimizer: the class, its flags, its closure convention and epoch hooks.
    ``takes_model``: the first constructor argument is the model (K-FAC hooks its layers);
    otherwise the parameters are, and a class that accepts ``model=`` gets it too.
    ``resolve(kwargs, run)`` fills run-dependent arguments (``run``: the build namespace)."""
    cls: Callable[..., torch.optim.Optimizer]
    flags: Dict[str, Flag] = field(default_factory=dict)
    closure: str = "backward"
    help: str = ""
    takes_model: bool = False
    resolve: Optional[Callable[[Dict[str, Any], Any], None]] = None
    epoch_start: Optional[Callable[[torch.optim.Optimizer, Any], None]] = None
    epoch_end: Optional[Callable[[torch.optim.Optimizer, Any], None]] = None

    def __post_init__(self):
        if self.closure not in ("backward", "loss"):
            raise ValueError(f"closure must be 'backward' or 'loss', got {self.closure!r}")

    def flag(self, name: str) -> Flag:
        return self.flags[name]

    def default(self, name: str) -> Any:
        """The CLI default of flag ``name``: the entry's own, else the class's."""
        f = self.flags[name]
        value = class_default(self, name) if f.default is _CLASS else f.default
        kind = flag_type(name)
        return kind(value) if kind in (int, float) and not isinstance(value, bool) else value

    def build(self, model: nn.Module, params, a) -> torch.optim.Optimizer:
        """The optimizer with the hyperparameters in namespace ``a`` (one attribute per flag,
        plus ``seed`` and the run's ``epochs``/``batch_size``/``subset``/``dataset``/``bootstrap``)."""
        kwargs: Dict[str, Any] = {}
        for name, f in self.flags.items():
            value = getattr(a, name)
            if f.none is not _NONE and value == f.none:
                value = None
            arg = f.arg or name
            if f.index is None:
                kwargs[arg] = value
            else:
                kwargs.setdefault(arg, list(_signature_default(self.cls, arg)))[f.index] = value
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        if self.resolve is not None:
            self.resolve(kwargs, a)
        accepted = _accepted(self.cls)
        if "seed" in accepted:
            kwargs["seed"] = a.seed
        if self.takes_model:
            return self.cls(model, **kwargs)
        if "model" in accepted:
            kwargs["model"] = model
        return self.cls(params, **kwargs)


def _accepted(cls) -> set:
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= {p.name for p in inspect.signature(init).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names


def _signature_default(cls, arg: str) -> Any:
    """The default of constructor argument ``arg``, looked up along the MRO (a subclass may
    forward it through ``**kwargs``)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        p = inspect.signature(init).parameters.get(arg)
        if p is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is not p.empty:
            return p.default
    raise TypeError(f"{cls.__name__} has no constructor argument {arg!r} with a default")


def class_default(spec: OptimizerSpec, name: str) -> Any:
    """The class's default of flag ``name``, in CLI terms (None as the flag's ``none`` value)."""
    f = spec.flags[name]
    value = _signature_default(spec.cls, f.arg or name)
    if f.index is not None:
        value = value[f.index]
    if value is None and f.none is not _NONE:
        value = f.none
    return value


# ---- shared flag groups -------------------------------------------------------------------------
_LR = Flag("learning rate")
_BETAS = {"beta1": Flag("first-moment decay", arg="betas", index=0),
          "beta2": Flag("second-moment decay", arg="betas", index=1)}
def _hvp_flags(what: str, choices) -> Dict[str, Flag]:
    return {"hvp": Flag(what, choices=choices), "fd_eps": Flag("finite-difference HVP step q")}


_HVP = _hvp_flags("Hessian-vector products", HVP_METHODS)
_PAPER = "the AdaHessian/Hybrid paper's grid-searched value (ResNet-18, 1200 MNIST images, batch 100)"
_PAPER_RUN = ("; the CLI's default run is that paper's Table I setting (ResNet-18, MNIST 1200/200/200, "
              "15 epochs)")

_ADAHESSIAN = {
    **_BETAS, "eps": Flag("denominator epsilon"), "weight_decay": Flag("decoupled weight decay"),
    "hessian_power": Flag("AdaHessian: Hessian power k"),
    "update_each": Flag("AdaHessian: steps between Hessian-diagonal refreshes"),
    "n_samples": Flag("AdaHessian: Hutchinson probes per refresh"),
    "block_size": Flag("AdaHessian: block average b of 1-D/2-D tensors (eq. 9; 0: none)", none=0),
    "abs_before_average": Flag("AdaHessian: D^(s) = mean |D| (Yao et al.'s released code) instead of eq. 9's "
                               "mean of the signed D"),
    **_hvp_flags("Hessian-vector products ('forward_over_reverse': the probe as the closure's forward-mode tangent)",
                 ONE_PROBE_HVP_METHODS),
}

_NATASHA = {
    "lr": _LR, "sigma": Flag("Natasha regulariser weight sigma"),
    "epoch_size": Flag("Natasha epoch length B (inner steps)"),
    "subepochs": Flag("Natasha sub-epochs p (m = B/p)"),
    "snapshot_batches": Flag("Natasha: minibatches averaged into mu per epoch (0: B = epoch_size, report Alg. 1 "
                             "line 24; 1: the cheap one-minibatch mu)", none=0),
}

_KFAC_DAMPING_WHY = ("with cov_every 10 / inv_every 100 the stale early inverses made 1e-3 diverge on "
                     "LeNet-5/MNIST within 2 epochs; 0.03 trains (ANG/IFANG recompute their factors every step, "
                     "as the paper does, and keep the class's damping)")
_DAMPING = Flag("damping gamma of the Kronecker block: sqrt(gamma) added to each factor (factored Tikhonov); "
                "0: use --factor-damping / the class default", none=0)
_FACTOR_DAMPING = Flag("lam added to each Kronecker factor (Tang et al. eq. 8); 0: the class default (ANG 0.03, "
                       "IFANG 0.3) unless --damping is given", none=0)
_KFAC = {
    "lr": _LR, "momentum": Flag("momentum"),
    "damping": Flag(_DAMPING.help, none=0, default=3e-2, why=_KFAC_DAMPING_WHY),
    "factor_damping": _FACTOR_DAMPING,
    "stat_decay": Flag("K-FAC: EMA decay of the factors"), "weight_decay": Flag("L2 weight decay"),
    "kl_clip": Flag("K-FAC KL clipping (0 disables)", none=0),
    "cov_every": Flag("steps between statistics refreshes"),
    "inv_every": Flag("K-FAC: steps between inverse refreshes"),
    "inverse": Flag("K-FAC damped inverse: cholesky or eigh"),
    "fisher": Flag("K-FAC family: the Fisher of the factors (mc: sampled targets; type2: exact GGN; empirical: "
                   "the labels' own gradients)", choices=FISHER_TYPES, type=str),
    "likelihood": Flag("K-FAC family: the output distribution of fisher mc/type2", choices=LIKELIHOODS, type=str),
    "mc_samples": Flag("K-FAC family: sampled targets per example (fisher mc)"),
}
_ANG = {
    "lam_schedule": Flag("ANG lambda strategy (0 = natural gradient -> 1 = Euclidean)", choices=LAMBDA_SCHEDULES, type=str),
    "total_steps": Flag("ANG: steps over which lambda reaches 1 (0: the whole run)", none=0),
}


def _run_steps(kwargs: Dict[str, Any], a) -> None:
    """ANG/IFANG: lambda reaches 1 at the end of the run unless --total-steps says otherwise."""
    if kwargs.get("total_steps") is None:
        n_train = data.subset_sizes(a.dataset, a.subset)[0]
        kwargs["total_steps"] = max(1, a.epochs * data.num_batches(n_train, a.batch_size, a.bootstrap))


_TR = {
    "norm": Flag("TR/ARC: shape A of the region (eq. 3 RMSProp, eq. 2 Adagrad, or A = I)", choices=NORMS),
    "beta": Flag("TR/ARC: RMSProp decay of the ellipsoid (eq. 3)"),
    "eps": Flag("TR/ARC: epsilon added to the ellipsoid diagonal"),
    "gamma": Flag("TR/ARC: radius / sigma factor (> 1)"),
    "curvature": Flag("TR/ARC: B = Hessian or generalised Gauss-Newton", choices=CURVATURES), **_HVP,
}


def _hybrid_epoch_end(opt, ctx) -> None:
    """The Hybrid's switch test: report the epoch's validation loss (the training loss when the
    run has no validation set)."""
    loss = ctx.metrics.get("val_loss", math.nan)
    if loss != loss:
        loss = ctx.metrics.get("train_loss", math.nan)
    opt.report_validation_loss(loss, epoch=ctx.epoch)


OPTIMIZERS: Dict[str, OptimizerSpec] = {
    "sgd": OptimizerSpec(
        torch.optim.SGD, help="plain SGD (torch.optim.SGD); lr 0.01 as in the AdaHessian/Hybrid paper",
        flags={"lr": Flag("learning rate", default=0.01, why=_PAPER), "weight_decay": Flag("L2 weight decay")}),
    "sgd-momentum": OptimizerSpec(
        torch.optim.SGD,
        help="SGD with heavy-ball momentum (torch.optim.SGD); lr 0.005, momentum 0.9 (AdaHessian/Hybrid paper)",
        flags={"lr": Flag("learning rate", default=0.005, why=_PAPER),
               "momentum": Flag("momentum", default=0.9,
                                why=_PAPER + "; torch's SGD has no momentum by default (its buf = mu buf + g is "
                                             "the form the paper's Table I ran, see HybridSGDAdaHessian)"),
               "nesterov": Flag("Nesterov momentum"), "weight_decay": Flag("L2 weight decay")}),
    "adam": OptimizerSpec(
        torch.optim.Adam, help="Adam (torch.optim.Adam); lr 0.001, betas (0.9, 0.999) (AdaHessian/Hybrid paper)",
        flags={"lr": _LR, **_BETAS, "eps": Flag("denominator epsilon"), "weight_decay": Flag("L2 weight decay")}),
    "adahessian": OptimizerSpec(
        AdaHessian, closure="loss",
        help="AdaHessian (Yao et al. 2021): Hutchinson diagonal (fused kernel), conv-kernel spatial averaging, "
             "Hessian power; lr 0.1, betas (0.9, 0.999) (AdaHessian/Hybrid paper)",
        flags={"lr": Flag("learning rate", default=0.1,
                          why=_PAPER + _PAPER_RUN + "; the class keeps Yao et al.'s 0.15"), **_ADAHESSIAN}),
    "hybrid": OptimizerSpec(
        HybridSGDAdaHessian, closure="loss", epoch_end=_hybrid_epoch_end,
        help="Hybrid (AdaHessian/Hybrid paper): SGD-momentum (lr 0.005, momentum 0.9) until the validation loss "
             "falls below tl = 1.0, then AdaHessian (lr 0.001, betas (0.9, 0.999)); without a validation set "
             "the switch tests the epoch's training loss",
        flags={"lr": _LR, **_ADAHESSIAN,
               "switch_threshold": Flag("Hybrid: validation loss tl below which AdaHessian takes over (the "
                                        "training loss when the run has no validation set)"),
               "sgd_lr": Flag("Hybrid: learning rate of the SGD-momentum phase"), "momentum": Flag("momentum"),
               "sgd_momentum_form": Flag("Hybrid: SGD-phase momentum, torch (buf = mu buf + g, what produced the "
                                         "paper's Table I) or paper (eq. 2, mu m + (1 - mu) g)",
                                         choices=SGD_MOMENTUM_FORMS)}),
    "natasha15": OptimizerSpec(
        Natasha15, closure="loss",
        help="Natasha1.5 (Allen-Zhu 2018): SVRG epochs, sub-epoch averaging, mu from B minibatches (report Alg. 1); "
             "alpha 0.01, B 27, p 9, sigma 0.5 (report appendix); --no-variance-reduction = the report's "
             "experiment (its Alg. 2)",
        flags={**_NATASHA, "variance_reduction": Flag("Natasha1.5: faithful variance-reduced estimator")}),
    "natasha2": OptimizerSpec(
        Natasha2, closure="loss",
        help="Natasha2 (Allen-Zhu 2018): Oja's algorithm on I - eta H, kick along negative curvature (tested on "
             "fresh minibatches), else a Natasha1.5 epoch; --hvp auto|exact|finite_difference, --variant "
             "faithful|simplified (report Alg. 3-4); the report's run: --variant simplified --hvp "
             "finite_difference --kick-test-batches 0",
        flags={**_NATASHA,
               "delta": Flag("Natasha2 curvature threshold delta (kick if v'Hv <= -delta/2; ceil(1/delta^2) Oja "
                             "iterations)"),
               "oja_eta": Flag("Natasha2 Oja step eta (power method on I - eta H; needs eta |lambda_max| <= 1)",
                               arg="eta"),
               "oja_iters": Flag("Natasha2 Oja iterations (0: ceil(1/delta^2), capped at 1000)", none=0),
               "kick_test_batches": Flag("Natasha2: fresh minibatches for the kick test v'Hv (0: Oja's own, biased "
                                         "low)"),
               "oja_eta_check": Flag("Natasha2: when an Oja iterate shows eta lambda_max > 1: warn or adapt",
                                     arg="eta_check", choices=ETA_CHECKS, type=str),
               **_HVP, "variant": Flag("Natasha2 variant: faithful or simplified")}),
    "kfac": OptimizerSpec(
        KFAC, closure="loss", takes_model=True,
        help="K-FAC (Martens & Grosse 2015): EMA Kronecker factors, damped inverses, KL clip, momentum",
        flags=_KFAC),
    "ekfac": OptimizerSpec(
        EKFAC, closure="loss", takes_model=True,
        help="EKFAC (George et al. 2018): K-FAC's eigenbasis refreshed every inv_every steps, eigenvalues "
             "corrected from per-example gradients every step, Tikhonov damping, KL clip, momentum",
        flags={**{k: v for k, v in _KFAC.items()
                  if k not in ("damping", "factor_damping", "inverse", "fisher", "likelihood", "mc_samples")},
               "damping": Flag("EKFAC damping gamma added to the corrected eigenvalues s*"),
               "inv_every": Flag("EKFAC: steps between eigenbasis refreshes")}),
    "ang": OptimizerSpec(
        ANG, closure="loss", takes_model=True, resolve=_run_steps,
        help="Asymptotic natural gradient (Tang et al., eq. 7): K-FAC slerped toward the Euclidean gradient; "
             "defaults = the paper's Alg. 2 (factors of each minibatch, lr 0.005, plain step)",
        flags={**_KFAC, "damping": _DAMPING, **_ANG}),
    "ifang": OptimizerSpec(
        IFANG, closure="loss", takes_model=True, resolve=_run_steps,
        help="Inverse-free ANG (eqs. 9-14): rank-s' group-mean factors applied by Sherman-Morrison-Woodbury; "
             "defaults = the paper's Alg. 2 (rank 1, lr 0.005, plain step)",
        flags={**{k: v for k, v in _KFAC.items() if k not in ("stat_decay", "inv_every", "inverse")},
               "damping": _DAMPING, **_ANG, "rank": Flag("IFANG: number s' of row groups (rank of the factors)")}),
    "trust-region": OptimizerSpec(
        TrustRegion, closure="loss",
        help="stochastic trust region (Alg. 1), Steihaug CG in the ellipsoidal RMSProp norm (eq. 3); "
             "--norm spherical = A = I; radius 1e-4, eta 0.01, gamma 2, beta 0.8, CG 50 its / tol 0.1; radius x gamma "
             "on every accepted step, / gamma on rejection, no cap (Alg. 1 line 8); TrustRegion.practical's "
             "three tiers: --eta-very-successful 0.95 --max-radius 10",
        flags={**_TR, "radius": Flag("TR: initial radius Delta_0 (A-norm)"),
               "max_radius": Flag("TR: radius cap (inf: none, Alg. 1)"),
               "eta": Flag("TR: acceptance threshold on rho"),
               "eta_very_successful": Flag("TR: rho above which an accepted step grows the radius (0: eta, "
                                           "Alg. 1's two tiers)", none=0, type=float),
               "cg_max_iters": Flag("TR: Steihaug-CG iterations (curvature products) per step"),
               "cg_tol": Flag("TR: relative residual stopping CG")}),
    "arc": OptimizerSpec(
        ARC, closure="loss",
        help="adaptive cubic regularisation (Cartis et al. 2011) in the same adaptive norms, Lanczos + secular "
             "equation (or --subproblem cg); sigma 1, eta1 0.1, eta2 0.9, gamma 2, 25 Krylov its / tol 0.1; cubic "
             "term in the same A as the trust region (--norm-scale initial_mean: A / mean(a_0), "
             "ARC.practical's)",
        flags={**_TR, "sigma": Flag("ARC: initial cubic regularisation sigma"),
               "eta1": Flag("ARC: acceptance threshold on rho"),
               "eta2": Flag("ARC: rho above which sigma shrinks by gamma"),
               "subproblem": Flag("ARC subproblem solver: lanczos or cg"),
               "subproblem_max_iters": Flag("ARC: Krylov dimension / CG iterations per step"),
               "subproblem_tol": Flag("ARC: relative model-gradient tolerance"),
               "norm_scale": Flag("ARC: cubic term in A (raw, as TR) or in A / mean(a_0), a_0 the first "
                                  "step's ellipsoid (initial_mean)", choices=NORM_SCALES)}),
}


def get_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


def flag_table() -> Dict[str, Dict[str, Flag]]:
    """flag name -> {optimizer name -> Flag}: which optimizers use each flag.
    Raises if two optimizers give one flag different types (the flag could not parse both)."""
    table: Dict[str, Dict[str, Flag]] = {}
    for opt_name, spec in OPTIMIZERS.items():
        for flag_name in spec.flags:
            table.setdefault(flag_name, {})[opt_name] = spec.flag(flag_name)
    for flag_name in table:
        flag_type(flag_name, table)
    return table


def flag_type(name: str, table: Optional[Dict[str, Dict[str, Flag]]] = None) -> Callable[[str], Any]:
    """The type one flag parses to (float wins over int when optimizers mix them)."""
    per_opt = (table or flag_table())[name]
    kinds = {_raw_type(OPTIMIZERS[o], name) for o in per_opt}
    if kinds <= {int, float}:
        return float if float in kinds else int
    if len(kinds) > 1:
        raise TypeError(f"flag --{name.replace('_', '-')} has different types across optimizers "
                        f"{sorted(per_opt)}: {kinds}; give it one type (or rename it)")
    return kinds.pop()


def _raw_type(spec: OptimizerSpec, name: str):
    f = spec.flags[name]
    if f.type is not None:
        return f.type
    value = class_default(spec, name) if f.default is _CLASS else f.default
    if isinstance(value, bool):
        return bool
    if isinstance(value, (int, float, str)):
        return type(value)
    raise TypeError(f"flag --{name.replace('_', '-')} of {spec.cls.__name__}: cannot infer a type from the "
                    f"default {value!r}; give Flag(type=...)")


def defaults_table(markdown: bool = False) -> str:
    """Every flag whose CLI default differs from its class's default, with the reason."""
    rows: List[Tuple[str, str, str, str, str]] = []
    for opt_name, spec in OPTIMIZERS.items():
        for flag_name, f in spec.flags.items():
            if f.default is not _CLASS:
                rows.append((opt_name, "--" + flag_name.replace("_", "-"), repr(f.default),
                             f"{spec.cls.__name__}({f.arg or flag_name}{'' if f.index is None else f'[{f.index}]'}"
                             f"={class_default(spec, flag_name)!r})", f.why))
    head = ("optimizer", "flag", "CLI default", "class default", "why")
    if markdown:
        cell = lambda c: c.replace("|", "\\|")
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])
    return "\n".join(f"  {o} {fl}={cli} (class: {cls}): {why}" for o, fl, cli, cls, why in rows)


def _probe_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def check_hyperparameters(name: str, given: Dict[str, Any], run) -> Optional[Tuple[List[str], str]]:
    """Build optimizer ``name`` on a tiny probe model with the ``given`` flag values (the rest at
    their defaults) so that its class checks them. Returns None when it builds, else (the flags
    to blame, the class's message): one flag when it fails alone, all given ones when only
    their combination does. ``run``: the namespace of run attributes (seed, epochs, ...)."""
    from types import SimpleNamespace

    spec = get_spec(name)
    mine = {k: v for k, v in given.items() if k in spec.flags}
    defaults = {k: spec.default(k) for k in spec.flags}

    def error(values) -> Optional[str]:
        model = _probe_model()
        try:
            spec.build(model, list(model.parameters()), SimpleNamespace(**{**vars(run), **defaults, **values}))
        except (ValueError, TypeError, RuntimeError) as e:
            return str(e)
        return None

    for k, v in mine.items():
        msg = error({k: v})
        if msg is not None:
            return [k], msg
    msg = error(mine) if len(mine) > 1 else None
    return (sorted(mine), msg) if msg is not None else None


if __name__ == "__main__":
    print(defaults_table(markdown=True))
