"""The K-FAC family's defaults, each pinned to its paper's number with the citation (issue 16).
Changing a default must change this file (and README's 'Defaults and the papers' table).

ANG, IFANG: Tang, Jiang, Song, Gong, Li, Yu, Wang & Wang, "AsymptoticNG: a regularized natural
gradient optimization algorithm with look-ahead strategy" (2021).
KFAC: Martens & Grosse, "Optimizing neural networks with Kronecker-factored approximate
curvature" (2015), which adapts damping, step size and momentum at every step (Secs. 6.5, 7):
the fixed values below are the usual fixed-hyperparameter K-FAC's, stated as such.
"""
import inspect

import torch.nn as nn

from natasha_ext.optim import ANG, IFANG, KFAC


def _defaults(cls):
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _built(cls):
    """The resolved per-group hyperparameters of an instance built with the defaults."""
    model = nn.Sequential(nn.Linear(3, 2))
    opt = cls(model)
    return opt, opt.param_groups[0]


def test_ang_lr_is_the_papers():
    # Sec. 3.1: "the initial learning rate of SGD was set to 0.01, while that of other methods was
    # set to 0.005" (then a milestone step-down: an LR scheduler on top, not a default)
    assert _defaults(ANG)["lr"] == 0.005
    assert _defaults(IFANG)["lr"] == 0.005


def test_ang_step_is_plain():
    # Algorithm 2, line 9: theta_t <- theta_{t-1} + eta grad^D: no momentum, no KL clip
    for cls in (ANG, IFANG):
        opt, group = _built(cls)
        assert group["momentum"] == 0.0
        assert opt.kl_clip is None


def test_ang_factors_come_from_the_current_minibatch():
    # eqs. 9-10: the factors are the empirical statistics of the minibatch B at iteration t;
    # Algorithm 2, line 7: computed (and, line 7 via Algorithm 1, inverted) at every iteration
    d = _defaults(ANG)
    assert d["stat_decay"] == 0.0 and d["cov_every"] == 1 and d["inv_every"] == 1
    assert _defaults(IFANG)["cov_every"] == 1


def test_ang_damping_is_added_to_each_factor():
    # eqs. 8-13: lam I + A and lam I + DS (one lam per factor), not a damped Kronecker block.
    # The paper states no value for lam: 0.03 (ANG) and 0.3 (IFANG) are ours (README's table).
    for cls, lam in ((ANG, 0.03), (IFANG, 0.3)):
        opt, group = _built(cls)
        assert group["damping"] is None and group["factor_damping"] == lam
        assert opt._factor_damping(0) == lam


def test_ifang_rank_is_one():
    # Sec. 2.3: "In inverse-free we set s' = 1 to avoid the matrix inverse"
    assert _defaults(IFANG)["rank"] == 1


def test_kfac_defaults_and_their_sources():
    d = _defaults(KFAC)
    # Martens & Grosse Sec. 5: exponentially decaying averages with decay min(1 - 1/k, 0.95)
    assert d["stat_decay"] == 0.95
    # factored Tikhonov damping (Martens & Grosse Sec. 6.3, pi = 1): sqrt(gamma) per factor
    opt, group = _built(KFAC)
    assert group["damping"] == 1e-3 and group["factor_damping"] is None
    assert opt._factor_damping(0) == 1e-3 ** 0.5
    # fixed-hyperparameter K-FAC practice (no number in Martens & Grosse, who adapt them):
    # lr 0.01, momentum 0.9, KL clip 1e-3 (Ba, Grosse & Martens 2017), statistics every 10 steps
    # and inverses every 100 (Martens & Grosse: statistics every step, inverses every T3 = 20 steps)
    assert (d["lr"], d["momentum"], d["kl_clip"], d["cov_every"], d["inv_every"]) == (0.01, 0.9, 1e-3, 10, 100)


def test_practical_preset_is_the_k_fac_practice():
    # the practical additions stay available, by name, behind the preset
    model = nn.Sequential(nn.Linear(3, 2))
    ang = ANG.practical(model)
    g = ang.param_groups[0]
    assert (g["lr"], g["momentum"], g["damping"], g["factor_damping"], ang.kl_clip) == (0.01, 0.9, 1e-3, None, 1e-3)
    assert (ang.stat_decay, ang.cov_every, ang.inv_every) == (0.95, 10, 100)
    ifang = IFANG.practical(model)
    g = ifang.param_groups[0]
    assert (g["lr"], g["momentum"], g["damping"], ifang.kl_clip) == (0.01, 0.9, 1e-2, 1e-3)
    # overrides win, and an explicit per-factor lam replaces the preset's gamma
    o = ANG.practical(model, lr=0.1, factor_damping=0.2).param_groups[0]
    assert (o["lr"], o["damping"], o["factor_damping"]) == (0.1, None, 0.2)


def test_which_fisher_each_class_estimates():
    # Tang et al. Sec. 2.3 (eqs. 9-10): "we estimate the Kronecker factors by the empirical
    # statistics over a mini-batch of training data", DS the training loss's pre-activation
    # derivatives: ANG/IFANG default to the empirical Fisher. Martens & Grosse Sec. 5: targets
    # sampled from the model's predictive distribution: KFAC defaults to the MC Fisher.
    for cls in (ANG, IFANG):
        assert _built(cls)[0].fisher == "empirical", cls.__name__
    assert _built(KFAC)[0].fisher == "mc"
    assert _defaults(KFAC)["mc_samples"] == 1
