"""torch.optim's closure convention (zero_grad, forward, ``backward()``, return the loss), as
``torch.optim.LBFGS`` and PyTorch Lightning's automatic optimization use it, for every optimizer
of the zoo: it runs, it takes the same steps as the package's convention (which returns the loss
without backward) with the same engines, and the settings that need the package's convention
are refused naming the argument, with nothing changed."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from natasha_ext.curvature import hvp
from natasha_ext.optim import AdaHessian
from tests.suites.optimizer_zoo import ZOO, Problem, case_params

STEPS = 4
HESSIAN = [c for c in ZOO if not c.outputs and not c.package_closure_only]  # gradient + Hessian (or none) engines
GAUSS_NEWTON = [c for c in ZOO if c.outputs]               # curvature='gauss_newton': needs the graph
TAKES_HVP = [c for c in HESSIAN if "hvp" in inspect.signature(c.klass).parameters]
AUTO_HVP = [c for c in TAKES_HVP if "hvp" not in c.kwargs]  # hvp='auto' resolves per convention


def backward_closure(problem, model, opt, i, style="lbfgs"):
    """torch.optim's convention on batch ``i``. ``lbfgs``: returns the loss (its graph spent);
    ``lightning``: returns a detached copy, as Lightning's closure does; ``no_zero_grad``: forgets
    zero_grad (each evaluation's gradient must still be its own)."""
    x, y = problem.batch(i)

    def closure():
        if style != "no_zero_grad":
            opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss.detach().clone() if style == "lightning" else loss
    return closure


def run_backward(case, problem, model, opt, steps, style="lbfgs"):
    losses = []
    for i in range(steps):
        if case.before_step is not None:
            case.before_step(opt, i)
        losses.append(opt.step(backward_closure(problem, model, opt, i, style)))
    return losses


def package_twin(case):
    """The package-convention run that must take the same steps: finite-difference HVPs, the
    engine 'auto' picks for a closure that calls backward."""
    return {"hvp": "finite_difference"} if case in TAKES_HVP else {}


def snapshot(model, opt):
    """What a refused step must leave alone: parameters, counters, the Philox stream and the
    per-parameter state (including the state a first step creates lazily: Natasha15/Natasha2 set
    it up before they evaluate the closure, and the step wrapper removes it when the step raises)."""
    state = opt.state_dict()["state"]
    return [p.detach().clone() for p in model.parameters()], repr(opt.counters), repr(opt.rng.state_dict()), repr(state)


@case_params(HESSIAN)
@pytest.mark.parametrize("style", ["lbfgs", "lightning", "no_zero_grad"])
def test_backward_closure_takes_the_package_step(case, style):
    """(a) + (b): the same parameters, losses and counters as the package's convention with the
    same engines, bit for bit (the gradient is the same backward, read from .grad instead of
    torch.autograd.grad), for every optimizer and each way of writing the closure."""
    problem = Problem()
    m_pkg, m_bwd = problem.model(), problem.model()
    o_pkg, o_bwd = case.make(m_pkg, **package_twin(case)), case.make(m_bwd)
    l_pkg = case.run(problem, m_pkg, o_pkg, 0, STEPS)
    l_bwd = run_backward(case, problem, m_bwd, o_bwd, STEPS, style)
    assert o_bwd.counters["steps"] > 0
    assert [float(v) for v in l_bwd] == [float(v) for v in l_pkg]
    for a, b in zip(m_bwd.parameters(), m_pkg.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert repr(o_bwd.counters) == repr(o_pkg.counters)  # repr: last_rayleigh may be NaN
    assert any(not torch.equal(a, b) for a, b in zip(m_bwd.parameters(), problem.model().parameters()))


@case_params(AUTO_HVP)
def test_auto_hvp_matches_exact_to_finite_difference_accuracy(case):
    """hvp='auto' with a backward-calling closure (finite differences) against the package
    convention's exact double backward: six steps in fp64 (the hybrids switch by then) agree to
    the finite-difference error O(fd_eps), relative to how far the parameters moved."""
    problem = Problem(dtype=torch.float64)
    m_pkg, m_bwd = problem.model(), problem.model()
    o_pkg, o_bwd = case.make(m_pkg, hvp="exact"), case.make(m_bwd)
    case.run(problem, m_pkg, o_pkg, 0, 6)
    run_backward(case, problem, m_bwd, o_bwd, 6)
    assert o_bwd.counters["hvps"] > 0
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])
    moved = float((flat(m_pkg) - flat(problem.model())).norm())
    assert moved > 0
    assert float((flat(m_bwd) - flat(m_pkg)).norm()) <= 1e-2 * moved


def test_hvp_engine_resolves_auto_by_convention():
    """The engine itself: inside a step's watch, 'auto' is the exact double backward for a
    package closure and a finite difference for a backward-calling one (close, not equal)."""
    problem = Problem(dtype=torch.float64)
    model = problem.model()
    params = list(model.parameters())
    x, y = problem.batch(0)
    v = [torch.randn_like(p) for p in params]

    def bwd():
        model.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss
    with hvp.watching(params):
        exact = hvp.HVP(lambda: F.mse_loss(model(x), y), params, method="auto")
        fd = hvp.HVP(bwd, params, method="auto")
        assert (exact.method, fd.method) == ("exact", "finite_difference")
        assert all(torch.equal(a, b) for a, b in zip(exact.grads, fd.grads))
        he, hf = torch.cat([h.flatten() for h in exact(v)]), torch.cat([h.flatten() for h in fd(v)])
    assert not torch.equal(he, hf)
    torch.testing.assert_close(hf, he, rtol=0, atol=1e-3 * float(he.norm()))


@case_params(HESSIAN)
def test_grad_holds_the_gradient_at_the_start_of_the_step(case):
    """After step(backward closure), .grad is the gradient at the point the step started from
    (the first evaluation), as after loss.backward(); opt.step(): the later evaluations (finite
    differences, snapshots, trial points) put it back."""
    problem = Problem()
    model = problem.model()
    opt = case.make(model)
    for i in range(STEPS):
        if case.before_step is not None:
            case.before_step(opt, i)
        x, y = problem.batch(i)
        expected = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
        opt.step(backward_closure(problem, model, opt, i))
        for p, g in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@case_params(HESSIAN)
def test_package_closure_with_stale_grad_is_not_taken_for_a_backward_one(case):
    """A package-convention closure (loss with grad_fn, no backward) is not mistaken for one that
    called backward because .grad happens to hold something: the step is the one taken with
    .grad None, and .grad is left as it was (K-FAC sets it to the step's gradient, as documented)."""
    problem = Problem()
    m_ref, m = problem.model(), problem.model()
    o_ref, o = case.make(m_ref), case.make(m)
    case.run(problem, m_ref, o_ref, 0, STEPS)
    stale = [torch.full_like(p, 7.0) for p in m.parameters()]
    for i in range(STEPS):
        for p, s in zip(m.parameters(), stale):
            p.grad = s
        if case.before_step is not None:
            case.before_step(o, i)
        o.step(case.closure(problem, m, i))
        if not case.takes_model:
            assert all(p.grad is s for p, s in zip(m.parameters(), stale))
    for a, b in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


PACKAGE_ENGINES = [(c, "exact") for c in TAKES_HVP] + [  # forward over reverse: AdaHessian's one probe
    (c, "forward_over_reverse") for c in TAKES_HVP if issubclass(c.klass, AdaHessian) and c.kwargs.get("n_samples", 1) == 1]


@pytest.mark.parametrize("case,engine", PACKAGE_ENGINES, ids=[f"{c.name}-{e}" for c, e in PACKAGE_ENGINES])
@pytest.mark.parametrize("style", ["lbfgs", "lightning"])
def test_exact_hvp_with_a_backward_closure_is_refused_naming_hvp(case, engine, style):
    """(c) hvp='exact' or 'forward_over_reverse' asked for explicitly cannot work with a closure
    that runs backward itself (the graph is spent; the tangents meet its backward, which for
    mse_loss fails inside it): a ValueError naming hvp, parameters, state and counters unchanged."""
    problem = Problem()
    model = problem.model()
    opt = case.make(model, hvp=engine)
    if case.before_step is not None:  # the hybrid: straight to its AdaHessian phase
        case.before_step(opt, 10)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"hvp='{engine}'.*called backward\(\).*hvp='finite_difference'"):
        opt.step(backward_closure(problem, model, opt, 0, style))
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0])) and after[1:] == before[1:]


@case_params(GAUSS_NEWTON)
@pytest.mark.parametrize("style", ["lbfgs", "lightning"])
def test_gauss_newton_with_a_backward_closure_is_refused_naming_curvature(case, style):
    """(c) Gauss-Newton products need the outputs' graph, which backward() frees: a ValueError
    naming curvature (also when the optimizer pairs a loss-only closure with model=)."""
    problem = Problem()
    model = problem.model()
    opt = case.klass(model.parameters(), model=model, **case.kwargs)  # pairs a loss-only closure
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="curvature='gauss_newton'.*called backward"):
        opt.step(backward_closure(problem, model, opt, 0, style))
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0])) and after[1:] == before[1:]


@case_params(HESSIAN[:1] + [c for c in HESSIAN if c.takes_model][:1] + TAKES_HVP[-1:])
def test_a_detached_loss_without_backward_names_both_conventions(case):
    """A closure that neither keeps the graph nor calls backward: the error says what either
    convention needs."""
    problem = Problem()
    model = problem.model()
    opt = case.make(model)
    x, y = problem.batch(0)
    with pytest.raises(ValueError, match=r"without grad_fn and wrote no gradient.*without calling backward.*"
                                         r"loss\.backward\(\)"):
        opt.step(lambda: F.mse_loss(model(x), y).detach())


@case_params([c for c in HESSIAN if c.cls in ("Natasha15", "KFAC", "AdaHessian")][::2])
def test_loss_scaling_with_a_backward_closure_is_refused(case):
    """natasha_ext.amp.scaled_step scales the loss the optimizer differentiates; a closure whose
    own backward ran on the unscaled loss is refused, with nothing changed."""
    from natasha_ext import amp

    problem = Problem()
    model = problem.model()
    kw = {"grad_scaler": torch.amp.GradScaler("cpu", init_scale=1024.0)} if case.takes_model else {}
    opt = case.make(model, **kw)
    scaler = kw.get("grad_scaler") or torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"loss scaling.*called backward\(\)"):
        amp.scaled_step(opt, backward_closure(problem, model, opt, 0), scaler)
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0])) and after[1:] == before[1:]
