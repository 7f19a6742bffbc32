"""The CPU kernels' streaming-store paths (csrc/cpu/streaming.h): taken for write-only outputs
larger than kStreamMinBytes (16 MiB), with a regular store wherever an output is not 32-byte
aligned. Small lists never reach them, so these lists are large, and one tensor of each list is
a view at an odd offset (unaligned) next to aligned ones."""
import pytest
import torch

from natasha_ext import ops
from natasha_ext.ops import reference
from tests.helpers import elementwise_tol

pytestmark = [pytest.mark.skipif(not ops.fused_available(), reason="CPU kernels not built"),
              pytest.mark.usefixtures("one_thread")]

STREAM_MIN_BYTES = 16 << 20
# 4 write-only fp32 lists of 1.2 M elements (19 MB) cross the threshold for tr_cg_init_; D alone
# needs 4.2 M elements (hutchinson_diag_). The unaligned tensor is x[1:] of a larger buffer.
SIZES = [70_001, 1_100_000, 30_000, 1_203]


def _lists(sizes, dtype, seed, positive=False, n_scale=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        n *= n_scale
        base = torch.randn(n + 1, generator=g, dtype=torch.float64)
        base = (base.abs() + 0.1 if positive else base).to(dtype)
        out.append(base[1:] if k == 1 else base[:n].clone())  # tensor 1: storage offset 1 (unaligned)
    return out


def test_lists_cross_the_threshold_and_one_is_unaligned():
    assert 4 * sum(SIZES) * 4 > STREAM_MIN_BYTES
    t = _lists(SIZES, torch.float32, 0)
    assert t[1].data_ptr() % 32 != 0 and t[0].data_ptr() % 32 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["spherical", "rmsprop", "adagrad"])
def test_tr_cg_init_streaming_matches_reference(dtype, mode):
    g = _lists(SIZES, dtype, 1)
    g[0][:100] = 0.0
    f = {k: _lists(SIZES, dtype, 2 + i, positive=(k == "v")) for i, k in enumerate("vasrp")}
    R = {k: [t.clone() for t in ts] for k, ts in f.items()}
    out = ops.tr_cg_init_(f["v"], f["a"], f["s"], f["r"], f["p"], g, 0.8, 1e-3, mode, fused=True)
    ref = reference.tr_cg_init_(R["v"], R["a"], R["s"], R["r"], R["p"], g, 0.8, 1e-3, ops.trust_region.TR_MODES[mode])
    tol = elementwise_tol(dtype)
    torch.testing.assert_close(out, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    for k in "vasrp":
        for x, y in zip(f[k], R[k]):
            torch.testing.assert_close(x, y, **tol)
    # p = -(g/a) keeps the sign of zero: g = 0 gives p = -0, as the reference's negation
    assert torch.signbit(f["p"][0][:100]).all() and torch.equal(torch.signbit(f["p"][0]), torch.signbit(R["p"][0]))


@pytest.mark.parametrize("accumulate", [False, True])
def test_hutchinson_streaming_is_bit_identical_to_reference(accumulate):
    hz = _lists(SIZES, torch.float32, 7, n_scale=4)
    assert 4 * sum(t.numel() for t in hz) > STREAM_MIN_BYTES
    a = _lists(SIZES, torch.float32, 8, n_scale=4)
    b = [t.clone() for t in a]
    ops.hutchinson_diag_(a, hz, 1234567, 9, alpha=0.25, accumulate=accumulate, fused=True)
    reference.hutchinson_diag_(b, hz, 1234567, 9, 0.25, accumulate)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
