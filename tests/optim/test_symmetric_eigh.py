"""curvature.kronecker.symmetric_eigh: LAPACK's fp32 eigh failed to converge on a ResNet-18 K-FAC
factor (EKFAC's eigenbasis, end-to-end benchmark); the fallbacks are fp64, then fp64 with a
1e-12 relative jitter, then a clear error. The failure is planted by wrapping torch.linalg.eigh."""
import pytest
import torch

from natasha_ext.curvature import kronecker
from natasha_ext.optim import EKFAC


def _failing_eigh(monkeypatch, fails):
    real = torch.linalg.eigh
    calls = []

    def eigh(a, *args, **kw):
        calls.append(a.dtype)
        if fails(a):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (planted)")
        return real(a, *args, **kw)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    return calls


def _spd(n, k=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k, n, n, generator=g)
    return x @ x.mT + torch.eye(n)


def test_fp32_failure_is_redone_in_fp64(monkeypatch):
    a = _spd(6)
    want = torch.linalg.eigh(a.double())
    calls = _failing_eigh(monkeypatch, lambda m: m.dtype == torch.float32)
    evals, evecs = kronecker.symmetric_eigh(a)
    assert calls == [torch.float32, torch.float64]
    assert evals.dtype == evecs.dtype == torch.float32
    torch.testing.assert_close(evals, want[0].float())
    torch.testing.assert_close(evecs @ torch.diag_embed(evals) @ evecs.mT, a, rtol=1e-5, atol=1e-4)


def test_then_a_jitter_then_a_clear_error(monkeypatch):
    a = _spd(5, 1)[0]
    tries = []
    calls = _failing_eigh(monkeypatch, lambda m: tries.append(1) or len(tries) < 3)
    evals, _ = kronecker.symmetric_eigh(a)
    assert calls == [torch.float32, torch.float64, torch.float64]
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(a.double()).float(), rtol=1e-6, atol=1e-6)
    _failing_eigh(monkeypatch, lambda m: True)
    with pytest.raises(torch.linalg.LinAlgError, match=r"\(5, 5\) K-FAC factor did not converge"):
        kronecker.symmetric_eigh(a)


def test_ekfac_steps_through_fp32_eigh_failures(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = EKFAC(model, lr=0.05, inv_every=1)
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)
    calls = _failing_eigh(monkeypatch, lambda m: m.dtype == torch.float32)
    first = float(loss().detach())
    for _ in range(5):
        opt.step(loss)
    assert torch.float32 in calls and torch.float64 in calls  # the fp32 eigh failed, fp64 took over
    assert all(torch.isfinite(p).all() for p in model.parameters()) and float(loss().detach()) < first
