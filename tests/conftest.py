import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny problems: intra-op threads only add contention on the shared test machine, where
    multi-threaded torch stalls (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_report_header(config):
    from natasha_ext import _backend

    return (f"natasha_ext: fused devices={sorted(_backend.FUSED_DEVICES)} load_error={_backend.LOAD_ERROR} "
            f"threads={torch.get_num_threads()} expect_fused={os.environ.get('NATASHA_EXT_EXPECT_FUSED', '0')}")
