"""How close a fused kernel must come to the reference: every tolerance of the self-test, and why.

The error of one output element is ``|fused - reference| / (1 + |reference|)`` (absolute near
zero, relative for large values: the ``rtol = atol = tol`` of ``torch.testing.assert_close``
that the test suites use). A check passes when the largest such error over all outputs is at
most ``tol``, NaN/inf patterns agree exactly and shapes/dtypes agree.

Why the two paths differ at all: they compute the same formula with another order of operations.
The kernels fuse (FMA contraction, one pass keeping intermediates in registers in the
accumulation dtype) and reduce chunk by chunk in a fixed tree; the reference runs one ATen op per
term (each rounding its result) and sums with ATen's pairwise reduction. Each difference is a few
roundings of the dtype the result is stored in, amplified at most by the op's conditioning:

* fp64: unit roundoff u = 1.1e-16. 1e-12 (~1e4 u) leaves room for reductions over millions of
  elements and divisions by small denominators (AdaHessian's sqrt(v) + eps, CG's a = v + eps).
* fp32: u = 6.0e-8. 4e-5 (~700 u): a sum of n positive terms in another order moves by up to
  ~sqrt(n) u typically; the largest lists here (4M elements on CPU, 17M on CUDA) stay well inside.
* fp16 / bf16 inputs: state and reductions accumulate in fp32 in both paths, but values written
  back in fp16/bf16 may round to the neighbouring representable number when the fp32 intermediate
  lies near a rounding boundary: one ulp is 2^-10 = 9.8e-4 (fp16) and 2^-7 = 7.8e-3 (bf16)
  relative, so 2e-3 and 2e-2 allow two ulps (fp16/bf16 tolerances of the op test suites).

Two kinds of check get more room, each for one stated reason:

* ``matmul`` (the K-FAC ops): BLAS/cuBLAS block the inner products of G^-1 T A^-1 differently from
  the kernels' own order, and inner dimensions reach a few hundred: x5.
* ``optimizer`` (a few steps of a whole optimizer): each step feeds its rounding differences into
  the next gradient, HVP and (trust region) accept/reject ratio: x5 over 3 steps (measured on
  CPU: at most 1.6e-6 in fp32 and 2e-15 in fp64, for TrustRegion).

Long sums are checked on inputs without cancellation (positive terms, see the ``chunks`` stress
cases): a 4M-term fp32 dot product of random signs legitimately moves by ~1e-4 of its value
with the summation order, which would hide a lost chunk as well as a tolerance that allows it.

``bitwise`` checks (Philox streams, repeated runs of one kernel) allow no difference at all.
"""
from __future__ import annotations

import torch

#: tolerance of one element's error for each dtype of a check (the dtype of its inputs)
DTYPE_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 4e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-2,
}

#: extra room for kinds of check (see the module docstring for the reason of each)
KIND_FACTOR = {"elementwise": 1.0, "matmul": 5.0, "optimizer": 5.0, "bitwise": 0.0}


def tolerance(dtype: torch.dtype, kind: str = "elementwise") -> float:
    """The largest error a check of ``kind`` on ``dtype`` inputs may show and still pass."""
    if kind not in KIND_FACTOR:
        raise ValueError(f"kind must be one of {sorted(KIND_FACTOR)}, got {kind!r}")
    if dtype not in DTYPE_TOLERANCE:
        raise ValueError(f"dtype must be one of {list(DTYPE_TOLERANCE)}, got {dtype}")
    return DTYPE_TOLERANCE[dtype] * KIND_FACTOR[kind]
