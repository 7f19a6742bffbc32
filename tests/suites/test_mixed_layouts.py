"""Every optimizer of the zoo under fused=None with fp32 and fp64 parameters together, and with
non-contiguous parameters (a transposed-view weight, a channels_last conv): the step completes,
state lives in each parameter's accumulation dtype, and a layout changes no value (issue 19 item 3)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from natasha_ext.precision import accumulation_dtype
import natasha_ext.optim as O
from tests.helpers import requires_fused
from tests.suites.optimizer_zoo import case_params


def _train(case, model, forward, steps=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    opt = case.make(model)
    for i in range(steps):
        x = torch.randn(8, *forward.in_shape, generator=g).to(dtype)
        y = torch.randn(8, 3, generator=g).to(dtype)
        if case.before_step is not None:
            case.before_step(opt, i)

        def closure():
            out = forward(x)
            loss = F.mse_loss(out, y)
            return (loss, out) if case.outputs else loss
        opt.step(closure)
    return opt


class _MixedMLP(nn.Module):
    """5 -> 8 (fp32) -> 3 (fp64)."""
    in_shape = (5,)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).double()).float()


@case_params()
def test_fp32_and_fp64_parameters_train_together(case):
    torch.manual_seed(0)
    m = _MixedMLP()
    start = [p.detach().clone() for p in m.parameters()]
    opt = _train(case, m, m)
    assert opt.counters["steps"] == 3 and opt.counters["skipped_steps"] == 0
    assert any(not torch.equal(a, p) for a, p in zip(start, m.parameters()))
    for p in m.parameters():
        assert torch.isfinite(p).all()
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert v.dtype == accumulation_dtype(p), (key, v.dtype, p.dtype)


class _ConvNet(nn.Module):
    in_shape = (2, 5, 5)

    def __init__(self):
        super().__init__()
        self.conv, self.lin = nn.Conv2d(2, 3, 3), nn.Linear(27, 3)

    def forward(self, x):
        if self.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        return self.lin(torch.tanh(self.conv(x)).flatten(1))


def _non_contiguous(m: _ConvNet) -> _ConvNet:
    m = copy.deepcopy(m)
    m.conv.to(memory_format=torch.channels_last)
    # a transposed view: same values, strides (1, out)
    m.lin.weight = nn.Parameter(m.lin.weight.detach().t().contiguous().t())
    assert not m.lin.weight.is_contiguous() and not m.conv.weight.is_contiguous()
    return m


@case_params()
def test_non_contiguous_parameters_take_the_same_steps(case):
    # fp64: finite-difference HVPs and trust-region decisions would amplify the fp32 round-off
    # of a different summation order into visible differences. Even fp64's differs by layout:
    # on a Xeon (AVX-512 BLAS paths) Gauss-Newton's three steps end 1.3e-9 apart (1.7e-7
    # relative) on one weight; a layout bug (a strided tensor read as contiguous) is O(1e-2).
    torch.manual_seed(0)
    ref = _ConvNet().double()
    other = _non_contiguous(ref)
    _train(case, ref, ref, dtype=torch.float64)
    opt = _train(case, other, other, dtype=torch.float64)
    assert opt.counters["steps"] == 3
    for a, b in zip(other.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@requires_fused
def test_kfac_fused_true_with_mixed_precisions_is_refused_at_construction():
    with pytest.raises(ValueError, match="one precision"):
        O.KFAC(_MixedMLP(), fused=True)
