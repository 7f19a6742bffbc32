"""The sampled Fisher (fisher='mc', KFAC's default) where the shared suites run deterministic Fisher
types (their N-ranks-equal-one-process check needs them): under bf16 autocast the statistics stay
fp32, non-finite logits skip the step instead of failing in the sampler, and a compiled training
step draws the same targets as the eager one."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.optim import IFANG, KFAC


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _batch(i=0):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


MAKERS = {
    "kfac": lambda m: KFAC(m, lr=0.05, cov_every=1, inv_every=1, seed=3, fisher="mc"),
    "ifang": lambda m: IFANG(m, lr=0.05, rank=2, total_steps=5, seed=3, fisher="mc"),
    # IFANG's default Fisher: its YG rows came out in the autocast dtype (bf16) before the fix
    "ifang_empirical": lambda m: IFANG(m, lr=0.05, rank=2, total_steps=5, seed=3),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_mc_statistics_stay_fp32_under_bf16_autocast(name):
    m = _model()
    opt = MAKERS[name](m)
    x, y = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda: F.cross_entropy(m(x), y))
    assert opt.counters["factor_updates"] == 1
    tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_nonfinite_logits_skip_the_step(name):
    m = _model()
    opt = MAKERS[name](m)
    x, y = _batch()
    opt.step(lambda: F.cross_entropy(m(x), y))
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()}
    params = [p.detach().clone() for p in m.parameters()]
    bad = x.clone()
    bad[0, 0] = float("nan")  # NaN logits for one example: the sampler must not raise
    opt.step(lambda: F.cross_entropy(m(bad), y))
    assert opt.counters["skipped_steps"] == 1
    for p, q in zip(m.parameters(), params):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, before[id(p)][k]), k


def test_compiled_step_draws_as_eager():
    def train_step(model, opt, x, y):
        return opt.step(lambda: F.cross_entropy(model(x), y))

    m_eager, m_comp = _model(), _model()
    o_eager, o_comp = MAKERS["kfac"](m_eager), MAKERS["kfac"](m_comp)
    torch._dynamo.reset()
    compiled = torch.compile(train_step, backend="eager")
    try:
        for i in range(3):
            x, y = _batch(i)
            train_step(m_eager, o_eager, x, y)
            compiled(m_comp, o_comp, x, y)
    finally:
        torch._dynamo.reset()
    for a, b in zip(m_eager.parameters(), m_comp.parameters()):
        assert torch.equal(a, b)
    assert o_comp.counters["factor_updates"] == 3
