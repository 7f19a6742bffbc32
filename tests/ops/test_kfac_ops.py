"""The K-FAC ops' contracts on plain inputs, fused and reference: kfac_precondition is
U = G_inv T A_inv for ANY matrices (symmetric inverses, as the optimizer feeds, would hide a
transposed or swapped factor), and kfac_smw_apply is U = (lam I + YG^T YG)^-1 T (lam I + YA^T YA)^-1
per layer, on square layers too (where swapping the two sides keeps every shape)."""
import pytest
import torch

from natasha_ext import ops
from tests.helpers import devices, matmul_tol, requires_fused

# (out, in): square layers (a swapped side keeps the shapes), rectangular ones both ways, 1 x 1
SHAPES = [(4, 4), (3, 5), (6, 2), (1, 1), (5, 5)]
FUSED = [False, pytest.param(True, marks=requires_fused)]


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _reductions(T, U):
    return torch.stack([torch.stack([(t * u).sum(), u.square().sum(), t.square().sum()]) for t, u in zip(T, U)])


def _check(T, U, red, want, dtype):
    for u, w in zip(U, want):
        assert u.dtype == dtype and u.shape == w.shape
        torch.testing.assert_close(u.double().cpu(), w, **matmul_tol(dtype))
    torch.testing.assert_close(red.double().cpu(), _reductions(T, want), **matmul_tol(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", FUSED)
def test_precondition_is_g_inv_t_a_inv_for_non_symmetric_matrices(device, dtype, fused):
    gen = torch.Generator().manual_seed(0)
    T = [_randn(gen, o, i) for o, i in SHAPES]
    g_inv = [_randn(gen, o, o) + o * torch.eye(o, dtype=torch.float64) for o, _ in SHAPES]
    a_inv = [_randn(gen, i, i) + i * torch.eye(i, dtype=torch.float64) for _, i in SHAPES]
    assert not torch.allclose(g_inv[0], g_inv[0].T) and not torch.allclose(a_inv[0], a_inv[0].T)
    to = lambda ts: [t.to(device, dtype) for t in ts]
    U, red = ops.kfac_precondition(to(T), to(g_inv), to(a_inv), fused=fused)
    _check(T, U, red, [g @ t @ a for t, g, a in zip(T, g_inv, a_inv)], dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("rank", [1, 3])
def test_smw_apply_is_the_dense_damped_inverse_on_each_side(device, dtype, fused, rank):
    gen = torch.Generator().manual_seed(rank)
    T = [_randn(gen, o, i) for o, i in SHAPES]
    ya = [0.7 * _randn(gen, rank, i) for _, i in SHAPES]
    yg = [1.3 * _randn(gen, rank, o) for o, _ in SHAPES]
    lams = [0.3, 0.05, 1.0, 0.2, 0.5]  # one per layer
    U, red = ops.kfac_smw_apply([t.to(device, dtype) for t in T], [y.to(device, dtype) for y in ya],
                                [y.to(device, dtype) for y in yg], lams, fused=fused)
    eye = lambda n: torch.eye(n, dtype=torch.float64)
    want = [torch.linalg.solve(lam * eye(t.shape[0]) + g.T @ g, t) @ torch.linalg.inv(lam * eye(t.shape[1]) + a.T @ a)
            for t, a, g, lam in zip(T, ya, yg, lams)]
    _check(T, U, red, want, dtype)
