"""What several test modules share: device and kernel markers, the sizes and dtypes the
fused-vs-reference tests sweep, and their tolerances. Import it as ``from tests.helpers import ...``
(tests/ is a package rooted at the repository, the one way tests import each other)."""
import pytest
import torch

from natasha_ext import ops

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on the GPU machine)")
requires_fused = pytest.mark.skipif(not ops.fused_available(), reason="compiled kernels not built")

# Tensor sizes that stress the multi-tensor kernels: empty, one element, small, just over a
# 4096-element block, just over a 65536-element chunk.
SIZES = [0, 1, 22, 4097, 65537]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def devices():
    """Devices the fused-vs-reference tests run on: cpu, plus cuda when present."""
    return ["cpu"] + (["cuda"] if CUDA else [])


def list_shapes():
    """Lists of tensor shapes for the multi-tensor ops: each size alone, all sizes together, a
    list longer than one launch's tensor table (> 110 tensors), a 4-D tensor with a large one."""
    return [[(n,)] for n in SIZES] + [[(n,) for n in SIZES], [((i % 7) * 13 + (i % 3),) for i in range(120)],
                                      [(3, 5, 7, 2), (70000,)]]


def dtypes(device, cpu_low=LOW_PRECISION):
    """fp32 and fp64, plus the low-precision dtypes: both on CUDA, ``cpu_low`` of them on the CPU
    (some CPU kernels take fewer)."""
    return [torch.float32, torch.float64] + list(LOW_PRECISION if device == "cuda" else cpu_low)


def elementwise_tol(dtype):
    """Fused vs reference for element-wise kernels: the same formula, another evaluation order."""
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=4e-5, atol=4e-5),
            torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def matmul_tol(dtype):
    """Fused vs reference for the K-FAC kernels: matrix products and per-layer sums, whose
    blocking differs between the kernel and ATen."""
    return {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}.get(
        dtype, dict(rtol=2e-2, atol=2e-2))
