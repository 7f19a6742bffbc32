"""Mixed precision and torch.compile for every optimizer of the zoo.

* bf16/fp16 parameters train with fp32 optimizer state, and resume bit-identically (the state
  keeps its fp32 dtype through load_state_dict, which torch.optim would otherwise cast).
* A closure running under ``torch.autocast("cpu", torch.bfloat16)``.
* Loss scaling (``natasha_ext.amp.scaled_step`` with a ``torch.amp.GradScaler``): a power-of-two
  scale changes nothing bit for bit; an overflowing scale skips steps and backs off.
* torch.compile of a training step that calls ``optimizer.step(closure)``: it runs and matches
  eager. What cannot be captured in one graph, and why (from ``torch._dynamo.explain``):
    - ``torch.autograd.grad`` (the engines differentiate inside step: dynamo graph-breaks on it
      unless trace_autograd_ops is enabled);
    - the host-side decisions, each one ``.item()``/``bool()``/``tolist()``: the non-finite
      check (skip the step), Natasha2's kick test, trust-region/ARC acceptance (rho), K-FAC's
      Cholesky fallback check, the CG/Lanczos stopping tests;
    - torch.optim's own step wrapper (profiling hooks: "step_unsupported").
  The fused ops themselves carry fake kernels: no graph break is located in natasha_ext/ops.
"""

import pytest
import torch

from natasha_ext import amp, ops
from tests.suites.optimizer_zoo import ZOO, ZOO_BY_NAME, Problem, case_params, flat_params, resumed_run, state_tensors

LOW = [torch.bfloat16, torch.float16]
# state that is a copy of the parameters themselves may keep their dtype (Natasha's x_tilde)
PARAM_COPIES = {"snapshot"}


def _scaler(**kw):
    return torch.amp.GradScaler("cpu", **kw)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@case_params()
def test_low_precision_params_keep_fp32_state(case, dtype):
    pb = Problem(dtype=dtype)
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 4)
    for p in m.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for k, v in o.state[p].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1 and k not in PARAM_COPIES:
                assert v.dtype == torch.float32, f"state {k!r} is {v.dtype}"
    for t in state_tensors(o):
        if t.is_floating_point():
            assert torch.isfinite(t).all()


# torch.optim.Optimizer.load_state_dict casts floating state to the parameter's dtype; an
# optimizer that keeps fp32 state for bf16 parameters must restore it (bit-exact resume).
@case_params()
def test_bf16_resume_is_bit_identical(case):
    pb, n = Problem(dtype=torch.bfloat16), case.resume_steps

    def state_kept_fp32(m2, o2):
        for p in m2.parameters():
            for k, v in o2.state[p].items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 1 and k not in PARAM_COPIES:
                    assert v.dtype == torch.float32, f"state {k!r} came back as {v.dtype}"

    m_ref, _, m2, _ = resumed_run(case, pb, n, init_seed=5, opt_seed=4321, after_load=state_kept_fp32)
    assert torch.equal(flat_params(m_ref), flat_params(m2))


@case_params()
def test_autocast_bf16_closure(case):
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    case.run(pb, m, o, 0, 4, autocast=("cpu", torch.bfloat16))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in m.parameters())
    assert not torch.equal(flat_params(m), flat_params(pb.model()))
    for t in state_tensors(o):
        if t.is_floating_point():
            assert t.dtype in (torch.float32, torch.float64) and torch.isfinite(t).all()


def _make(case, m, scaler=None):
    return case.make(m, grad_scaler=scaler) if case.takes_model else case.make(m)


@case_params()
def test_power_of_two_loss_scale_is_exact(case):
    """Scaling the loss by 2^k and unscaling inside the engines changes no bit."""
    pb = Problem()
    m1 = pb.model()
    o1 = _make(case, m1)
    case.run(pb, m1, o1, 0, 4)
    m2 = pb.model()
    scaler = _scaler(init_scale=2.0 ** 12, growth_interval=1000)
    o2 = _make(case, m2, scaler)
    for i in range(4):
        if case.before_step is not None:
            case.before_step(o2, i)
        amp.scaled_step(o2, case.closure(pb, m2, i), scaler)
    assert scaler.get_scale() == 2.0 ** 12 and o2.counters["skipped_steps"] == 0
    assert torch.equal(flat_params(m1), flat_params(m2))


@case_params()
def test_overflowing_loss_scale_skips_and_backs_off(case):
    """fp16 parameters with a loss scale far too large: the first steps overflow and are skipped
    (parameters untouched, state finite), the scale backs off until steps go through."""
    pb = Problem(dtype=torch.float16)
    m = pb.model()
    scaler = _scaler(init_scale=2.0 ** 24, growth_interval=1000)
    o = _make(case, m, scaler)
    p0 = flat_params(m)
    moved_at = None
    for i in range(20):
        if case.before_step is not None:
            case.before_step(o, i)
        before = flat_params(m)
        skipped = o.counters["skipped_steps"]
        amp.scaled_step(o, case.closure(pb, m, i), scaler)
        if o.counters["skipped_steps"] > skipped:
            assert torch.equal(before, flat_params(m))
        elif moved_at is None and not torch.equal(before, flat_params(m)):
            moved_at = i
        assert torch.isfinite(flat_params(m)).all()
    assert o.counters["skipped_steps"] >= 1 and scaler.get_scale() < 2.0 ** 24
    assert moved_at is not None and not torch.equal(p0, flat_params(m))
    for t in state_tensors(o):
        if t.is_floating_point():
            assert torch.isfinite(t).all()


def test_scaled_step_requires_the_scaler_for_kfac():
    case = ZOO_BY_NAME["kfac"]
    pb = Problem()
    m = pb.model()
    o = case.make(m)
    with pytest.raises(ValueError, match="grad_scaler"):
        amp.scaled_step(o, case.closure(pb, m, 0), _scaler())


def test_disabled_scaler_is_a_plain_step():
    case = ZOO_BY_NAME["adahessian"]
    pb = Problem()
    m1, m2 = pb.model(), pb.model()
    o1, o2 = case.make(m1), case.make(m2)
    o1.step(case.closure(pb, m1, 0))
    amp.scaled_step(o2, case.closure(pb, m2, 0), _scaler(enabled=False))
    assert torch.equal(flat_params(m1), flat_params(m2))


# ---------------------------------------------------------------------------- torch.compile
COMPILE_CASES = ["adahessian", "natasha15", "natasha2", "trust_region", "kfac", "ekfac"]


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compiled_training_step_matches_eager(name):
    case = ZOO_BY_NAME[name]
    pb = Problem()
    m_eager, m_comp = pb.model(), pb.model()
    o_eager, o_comp = case.make(m_eager), case.make(m_comp)

    def train_step(model, opt, x, y):
        def closure():
            out = model(x)
            loss = torch.nn.functional.mse_loss(out, y)
            return (loss, out) if case.outputs else loss
        return opt.step(closure)

    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="eager")
    for i in range(2):
        x, y = pb.batch(i)
        train_step(m_eager, o_eager, x, y)
        compiled(m_comp, o_comp, x, y)
    assert torch.equal(flat_params(m_eager), flat_params(m_comp))
    # where the graph breaks, and that none of it is inside the fused ops' Python face
    torch._dynamo.reset()
    x, y = pb.batch(2)
    explained = torch._dynamo.explain(train_step)(m_comp, o_comp, x, y)
    for br in explained.break_reasons:
        frames = [f.filename for f in (br.user_stack or [])]
        assert not any("/natasha_ext/ops/" in f for f in frames[-1:]), (br.reason, frames[-3:])
    torch._dynamo.reset()




def _all_op_calls(names):
    from tests.ops.test_ops_validation import VALID, call_op

    def run(argsets):
        outs = []
        for name, args in zip(names, argsets):
            outs.append(call_op(name, args))
        return outs

    return run, (lambda: [VALID[n]("cpu") for n in names])


def _compare_op_runs(names, backend):
    run, make = _all_op_calls(names)
    eager_args, comp_args = make(), make()
    torch._dynamo.reset()
    eager_out = run(eager_args)
    comp_out = torch.compile(run, fullgraph=True, backend=backend)(comp_args)
    torch._dynamo.reset()
    flat = lambda x: [t for y in (x if isinstance(x, (list, tuple)) else [x])
                      for t in (flat(y) if isinstance(y, (list, tuple)) else [y]) if isinstance(t, torch.Tensor)]
    for name, ea, ca, eo, co in zip(names, eager_args, comp_args, eager_out, comp_out):
        for a, b in zip(flat(list(ea)) + flat(eo), flat(list(ca)) + flat(co)):  # in-place lists and results
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")
def test_every_fused_op_compiles_in_one_graph_through_aot_autograd():
    """Every torch.ops.natasha op, called directly, traces with its fake kernel into ONE graph
    (fullgraph=True) and survives AOTAutograd's functionalization of the in-place lists
    (backend aot_eager); the compiled results equal eager."""
    from tests.ops.test_ops_validation import VALID

    _compare_op_runs(list(VALID), "aot_eager")


@pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")
def test_fused_ops_trace_fullgraph():
    """The global-norm non-finite check every step uses traces into one graph (fake kernel)."""
    xs = [torch.randn(5), torch.randn(3, 4)]
    f = torch.compile(lambda ts: torch.isfinite(ops.global_norm(ts, fused=True)), fullgraph=True, backend="eager")
    assert bool(f(xs))
