"""The C++ ops validate their inputs: every ``torch.ops.natasha.*`` op, called directly (not
through the Python wrappers, which check first), must answer a malformed argument -- lists of
different lengths, a tensor of another size, a non-float or mixed dtype, a non-contiguous tensor,
a tensor on another device -- with a RuntimeError that names the op, never with a crash or an
out-of-bounds access. One valid call per op (``VALID``) is mutated one argument at a time.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

from natasha_ext import ops
from tests.helpers import requires_cuda

pytestmark = pytest.mark.skipif(not ops.fused_available("cpu"), reason="compiled kernels not built")


def _t(*shape, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def _vec(device="cpu", dtype=torch.float32):
    """Two tensors of different shapes, the second 2-D (so a transpose makes it non-contiguous)."""
    return [_t(5, dtype=dtype, device=device), _t(3, 4, dtype=dtype, device=device)]


def _spd(n, device="cpu"):
    a = _t(n, n, device=device)
    return a @ a.T + n * torch.eye(n, device=device)


# op name -> factory of a valid positional argument tuple
VALID: Dict[str, Callable[[str], Tuple[Any, ...]]] = {
    "rademacher_": lambda d: (_vec(d), 0, 0),
    "global_norm": lambda d: (_vec(d),),
    "svrg_step_": lambda d: (_vec(d), _vec(d), _vec(d), _vec(d), _vec(d), _vec(d), _vec(d), 0.1, 0.2, 0, 1.0, 0.5),
    "oja_step_": lambda d: (_vec(d), _vec(d), torch.tensor(0.5, device=d), 0.1),
    "hutchinson_diag_": lambda d: (_vec(d), _vec(d), 0, 0, 1.0, False),
    "adahessian_step_": lambda d: (_vec(d), _vec(d), _vec(d), [t.abs() for t in _vec(d)], _vec(d), [1, 1], 1, True,
                                  0, 0, 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.1, 0.001),
    "kfac_factor_ema_": lambda d: ([_spd(4, d), _spd(3, d)], [_t(6, 4, device=d), _t(6, 3, device=d)], [1.0, 0.5], 0.9),
    "kfac_precondition": lambda d: ([_t(3, 4, device=d), _t(2, 5, device=d)], [_spd(3, d), _spd(2, d)],
                                    [_spd(4, d), _spd(5, d)]),
    "kfac_smw_apply": lambda d: ([_t(3, 4, device=d), _t(2, 5, device=d)], [_t(2, 4, device=d), _t(1, 5, device=d)],
                                 [_t(2, 3, device=d), _t(1, 2, device=d)], [0.1, 0.2]),
    "ang_combine_": lambda d: ([_t(3, 4, device=d), _t(2, 5, device=d)], [_t(3, 4, device=d), _t(2, 5, device=d)],
                               _t(2, 3, device=d).abs() + 0.1, torch.tensor(1.0, device=d), 0.5, False),
    "tr_cg_init_": lambda d: (_vec(d), _vec(d), _vec(d), _vec(d), _vec(d), _vec(d), 0.9, 1e-8, 1),
    "cg_dots": lambda d: (_vec(d), _vec(d), _vec(d), [t.abs() + 0.1 for t in _vec(d)]),
    "cg_step_": lambda d: (_vec(d), _vec(d), _vec(d), _vec(d), [t.abs() + 0.1 for t in _vec(d)], 0.1, 0.2),
}


def _list_args(args) -> List[int]:
    return [i for i, a in enumerate(args) if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]


def _noncontig(t):
    if t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)  # same shape and values, transposed strides
    return torch.stack([t, t], 1)[:, 0]  # stride 2


# mutation name -> (list, index) -> replacement list (None: not applicable)
MUTATIONS: Dict[str, Callable[[List[torch.Tensor]], Any]] = {
    "shorter_list": lambda ts: ts[:-1],
    "int_dtype": lambda ts: [ts[0].to(torch.int32)] + ts[1:],
    "mixed_dtype": lambda ts: [ts[0].double() if ts[0].dtype != torch.float64 else ts[0].float()] + ts[1:],
    "noncontiguous": lambda ts: ts[:-1] + [_noncontig(ts[-1])],
    "other_size": lambda ts: [torch.cat([ts[0].reshape(-1), ts[0].reshape(-1)[:1]])
                              if ts[0].dim() == 1 else torch.cat([ts[0], ts[0][:1]])] + ts[1:],
}

# Mutations an op legitimately accepts: a single free list (rademacher_ fills, global_norm sums
# any float tensors), K-FAC rows of any batch size, per-layer matrices cast to the layer's dtype,
# SMW factors read through strided matmuls, strided read-only inputs of the CPU kernels that
# gather them. The call must then succeed with finite results
# (checked equal to the contiguous / single-dtype call when the suite was written).
ACCEPTED = {
    ("rademacher_", 0, "shorter_list"), ("rademacher_", 0, "mixed_dtype"), ("rademacher_", 0, "other_size"),
    ("global_norm", 0, "shorter_list"), ("global_norm", 0, "other_size"), ("global_norm", 0, "mixed_dtype"),
    ("kfac_factor_ema_", 0, "mixed_dtype"), ("kfac_factor_ema_", 1, "mixed_dtype"), ("kfac_factor_ema_", 1, "other_size"),
    ("kfac_precondition", 1, "mixed_dtype"), ("kfac_precondition", 2, "mixed_dtype"),
    ("kfac_smw_apply", 1, "mixed_dtype"), ("kfac_smw_apply", 2, "mixed_dtype"),
    ("kfac_smw_apply", 1, "noncontiguous"), ("kfac_smw_apply", 2, "noncontiguous"),
    # read-only inputs the CPU kernels read with any strides (check_read_list)
    ("hutchinson_diag_", 1, "noncontiguous"), ("adahessian_step_", 1, "noncontiguous"),
    ("adahessian_step_", 4, "noncontiguous"),
}

# C++ validation gaps found by this suite (strict xfail: fixing one makes its test fail here)
KNOWN_GAPS: Dict[Tuple[str, int, str], str] = {}


def _cases():
    out = []
    for op, make in VALID.items():
        args = make("cpu")
        for i in _list_args(args):
            for mut in MUTATIONS:
                out.append(pytest.param(op, i, mut, id=f"{op}-arg{i}-{mut}"))
    return out


def _kwarg_only(op: str) -> List[str]:
    return [a.name for a in getattr(torch.ops.natasha, op).default._schema.arguments if a.kwarg_only]


# each op's keyword-only arguments (after ``*`` in its schema), read once outside any traced code
KWARG_ONLY = {op: _kwarg_only(op) for op in VALID} if ops.fused_available("cpu") else {}


def call_op(op: str, args) -> Any:
    """Call ``torch.ops.natasha.<op>`` with VALID's positional tuple: the schema's keyword-only
    arguments come last in it and are passed by name."""
    names = KWARG_ONLY[op]
    npos = len(args) - len(names)
    return getattr(torch.ops.natasha, op)(*args[:npos], **dict(zip(names, args[npos:])))


_call = call_op


@pytest.mark.parametrize("op", list(VALID))
def test_valid_call_runs(op):
    _call(op, VALID[op]("cpu"))


@pytest.mark.parametrize("op,index,mutation", _cases())
def test_malformed_list_argument_raises(op, index, mutation, request):
    key = (op, index, mutation)
    if key in KNOWN_GAPS:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_GAPS[key], strict=True))
    args = list(VALID[op]("cpu"))
    args[index] = MUTATIONS[mutation](list(args[index]))
    if key in ACCEPTED:
        out = _call(op, args)
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        outs += [t for t in args[0] if t.is_floating_point()]
        flat = [x for t in outs for x in (t if isinstance(t, (list, tuple)) else [t])]
        assert all(torch.isfinite(t).all() for t in flat)
        return
    with pytest.raises(RuntimeError) as info:
        _call(op, args)
    assert op.rstrip("_") in str(info.value), f"error does not name the op: {info.value}"


# (op, argument index, replacement) for the non-list arguments: scalars tensors, sizes, modes
BAD_SCALARS = [
    ("oja_step_", 2, lambda d: torch.tensor([0.5, 0.5], device=d)),                 # scale: 1 element
    ("ang_combine_", 2, lambda d: torch.ones(3, 3, device=d)),                     # reductions: (L, 3)
    ("ang_combine_", 3, lambda d: torch.ones(2, device=d)),                        # scale: 1 element
    ("adahessian_step_", 5, lambda d: [1]),                                         # one group size per param
    ("adahessian_step_", 5, lambda d: [0, 1]),                                      # group sizes >= 1
    ("adahessian_step_", 6, lambda d: 5),                                           # curv_mode in {0, 1, 2}
    ("kfac_smw_apply", 3, lambda d: [0.1]),                                        # one damping per layer
    ("kfac_factor_ema_", 2, lambda d: [1.0]),                                      # one scale per factor
    ("kfac_factor_ema_", 1, lambda d: [torch.ones(6, 5, device=d), torch.ones(6, 3, device=d)]),  # rows vs factor
    ("kfac_precondition", 1, lambda d: [torch.eye(3, device=d), torch.eye(3, device=d)]),         # g_inv shape
    ("kfac_smw_apply", 1, lambda d: [torch.ones(2, 4, device=d), torch.ones(2, 5, device=d)]),    # k differs
    ("tr_cg_init_", 8, lambda d: 7),                                               # mode in {0, 1, 2}
    ("svrg_step_", 9, lambda d: -1),                                               # finalize >= 0
]


@pytest.mark.parametrize("op,index,make", BAD_SCALARS, ids=[f"{o}-arg{i}" for o, i, _ in BAD_SCALARS])
def test_malformed_scalar_argument_raises(op, index, make):
    args = list(VALID[op]("cpu"))
    args[index] = make("cpu")
    with pytest.raises(RuntimeError, match=op.rstrip("_")):
        _call(op, args)


@requires_cuda
@pytest.mark.parametrize("op", list(VALID))
def test_cuda_kernels_refuse_a_tensor_on_another_device(op):
    """CUDA kernels: a valid call runs; one CPU tensor in a list of CUDA tensors is refused."""
    if not ops.fused_available("cuda"):
        pytest.skip("CUDA kernels not built")
    _call(op, VALID[op]("cuda"))
    for i in _list_args(VALID[op]("cuda")):
        args = list(VALID[op]("cuda"))
        args[i] = list(args[i])
        args[i][-1] = args[i][-1].cpu()
        with pytest.raises(RuntimeError):
            _call(op, args)
