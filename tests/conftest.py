import os

import pytest
import torch

import natasha_ext  # noqa: F401
from natasha_ext import ops

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run on the GPU machine)")
requires_fused = pytest.mark.skipif(not ops.fused_available(), reason="compiled kernels not built")


def devices():
    """Devices the fused-vs-reference tests run on: cpu, plus cuda when present."""
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    from natasha_ext import _backend

    return (f"natasha_ext: fused devices={sorted(_backend.FUSED_DEVICES)} load_error={_backend.LOAD_ERROR} "
            f"threads={torch.get_num_threads()} expect_fused={os.environ.get('NATASHA_EXT_EXPECT_FUSED', '0')}")
