"""The paper's image data sets on disk: each folder layout read into lists of (file, label), images loaded lazily.

A reader returns a :class:`FileSplit` (train and test items, class names); nothing is decoded until a sample is
read (:class:`ImageItems`, PIL). Labels follow the reference code (mammoth): the sorted class folders (CIFAR-100's
fine labels, CUB's numbered classes, MIT-67, RESISC45, CropDiseases), or the labels in the reference's split
files (ImageNet-R). ``split="reference"`` uses the reference's (or the data set's official) train/test split;
``"seeded"`` draws a per-class split of ``test_fraction`` from ``split_seed`` (Caltech-256 has only this one).
Missing data raises one :class:`ConfigError` line naming what to download and where to put it.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clcompose.strategies.core.registry import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class FileSplit:
    """Train and test items of a data set: ``items`` are file paths (or in-memory uint8 HWC arrays), ``labels`` ints."""

    train_items: list
    train_labels: np.ndarray
    test_items: list
    test_labels: np.ndarray
    class_names: list[str]


class ImageItems:
    """A map-style dataset of images read on access (PIL, converted to RGB) and passed through ``transform``.

    ``targets`` holds the labels (what Avalanche's class-incremental split reads without loading images).
    """

    def __init__(self, items: list, labels: np.ndarray, transform: Callable | None = None):
        self.items, self.targets, self.transform = list(items), [int(y) for y in labels], transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from PIL import Image

        item = self.items[index]
        if isinstance(item, np.ndarray):
            img = Image.fromarray(item, mode="RGB")
        else:
            with Image.open(item) as f:
                img = f.convert("RGB")
        return (self.transform(img) if self.transform is not None else img), self.targets[index]


def _missing(what: str, root: Path, expected: str, where: str) -> ConfigError:
    return ConfigError(
        f"{what} not found under {root} (expected {expected}); download it from {where} and set "
        "benchmark.data_root to the folder holding it"
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in skip)


def seeded_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a random ``test_fraction`` of the items (at least one when a class has two or more) is test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def folder_of_classes(folder: Path, skip: tuple[str, ...] = ()) -> tuple[list[Path], np.ndarray, list[str]]:
    """Images of ``folder/<class>/*``; labels = index of the class folder in sorted order."""
    classes = _class_folders(folder, skip)
    items, labels = [], []
    for k, c in enumerate(classes):
        files = _images(c)
        items += files
        labels += [k] * len(files)
    return items, np.asarray(labels, dtype=np.int64), [c.name for c in classes]


def _split_by(items, labels, names, test_fraction: float, seed: int) -> FileSplit:
    tr, te = seeded_split(labels, test_fraction, seed)
    return FileSplit([items[i] for i in tr], labels[tr], [items[i] for i in te], labels[te], names)


# ---------------------------------------------------------------------------------------------------- readers


def read_imagefolder(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """Any folder of class folders (``root/<class>/*``; seeded split), or ``root/train/<class>/*`` + ``root/test/<class>/*``."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr_items, tr_labels, names = folder_of_classes(root / "train")
        te_items, te_raw, te_names = folder_of_classes(root / "test")
        unknown = sorted(set(te_names) - set(names))
        if unknown:
            raise ConfigError(f"{root}/test has classes missing from {root}/train: {', '.join(unknown[:5])}")
        remap = np.asarray([names.index(n) for n in te_names], dtype=np.int64)
        return FileSplit(tr_items, tr_labels, te_items, remap[te_raw] if len(te_raw) else te_raw, names)
    if not root.is_dir() or not _class_folders(root):
        raise ConfigError(
            f"no class folders under {root} (expected {root}/<class>/<image>, or train/ and test/ "
            "folders of class folders); set benchmark.data_root to such a folder"
        )
    items, labels, names = folder_of_classes(root)
    return _split_by(items, labels, names, test_fraction, seed)


def read_cifar100(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """The official python version (``cifar-100-python/{train,test,meta}``, as torchvision unpacks it); fine labels."""
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        raise _missing(
            "CIFAR-100",
            root,
            "cifar-100-python/{train,test,meta}",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (untar it there)",
        )

    def load(name: str):
        with open(folder / name, "rb") as f:
            return pickle.load(f, encoding="latin1")

    names = list(load("meta")["fine_label_names"])
    parts = []
    for name in ("train", "test"):
        d = load(name)
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        parts.append((list(x), np.asarray(d["fine_labels"], dtype=np.int64)))  # 32×32 pixels: 180 MB in all
    if split == "seeded":
        items, labels = parts[0][0] + parts[1][0], np.concatenate([parts[0][1], parts[1][1]])
        return _split_by(items, labels, names, test_fraction, seed)
    return FileSplit(parts[0][0], parts[0][1], parts[1][0], parts[1][1], names)


def _read_reference_lists(root: Path, train_file: str, test_file: str, resolve: Callable[[str], Path]):
    import yaml

    out = []
    for name in (train_file, test_file):
        text = (root / name).read_text()
        d = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        labels = d.get("targets", d.get("labels"))
        out.append(([resolve(p) for p in d["data"]], np.asarray(labels, dtype=np.int64)))
    return out


def read_imagenet_r(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """``root/imagenet-r/<wnid>/*.jpg``; the reference split and labels from its ``imagenet-r_{train,test}.yaml``."""
    folder = root / "imagenet-r"
    if not folder.is_dir():
        raise _missing(
            "ImageNet-R",
            root,
            "imagenet-r/<wnid>/*.jpg",
            "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar (untar it there)",
        )
    if split == "seeded":
        items, labels, names = folder_of_classes(folder)
        return _split_by(items, labels, names, test_fraction, seed)
    files = ("imagenet-r_train.yaml", "imagenet-r_test.yaml")
    if not all((root / f).is_file() for f in files):
        raise ConfigError(
            f"the reference split of ImageNet-R is missing: put {files[0]} and {files[1]} (mammoth's "
            f"datasets/imagenet_r_utils/) in {root}, or set benchmark.split=seeded"
        )
    (tr, ytr), (te, yte) = _read_reference_lists(root, *files, lambda p: folder / Path(p).parent.name / Path(p).name)
    wnid = {}
    for path, y in zip(tr, ytr, strict=True):
        wnid[int(y)] = path.parent.name
    return FileSplit(tr, ytr, te, yte, [wnid.get(k, str(k)) for k in range(int(ytr.max()) + 1)])


def read_cub200(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """The official ``CUB_200_2011/`` (images/, images.txt, image_class_labels.txt, train_test_split.txt, classes.txt)."""
    folder = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    needed = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
    if not all((folder / f).is_file() for f in needed):
        raise _missing(
            "CUB-200-2011",
            root,
            "CUB_200_2011/{images/,images.txt,image_class_labels.txt,train_test_split.txt,classes.txt}",
            "https://data.caltech.edu/records/65de6-vp158",
        )

    def table(name: str) -> dict[str, str]:
        return dict(line.split(maxsplit=1) for line in (folder / name).read_text().splitlines() if line.strip())

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    names = [n for _, n in sorted(table("classes.txt").items(), key=lambda kv: int(kv[0]))]
    ids = sorted(paths, key=int)
    items = [folder / "images" / paths[i] for i in ids]
    y = np.asarray([int(labels[i]) - 1 for i in ids], dtype=np.int64)
    if split == "seeded":
        return _split_by(items, y, names, test_fraction, seed)
    tr = np.asarray([is_train[i].strip() == "1" for i in ids])
    return FileSplit([p for p, t in zip(items, tr) if t], y[tr], [p for p, t in zip(items, tr) if not t], y[~tr], names)


def read_caltech256(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """``256_ObjectCategories/NNN.name/*.jpg`` without ``257.clutter``; 256 classes, always a seeded split."""
    folder = root / "256_ObjectCategories" if (root / "256_ObjectCategories").is_dir() else root
    if not folder.is_dir() or not _class_folders(folder, skip=("257.clutter",)):
        raise _missing(
            "Caltech-256",
            root,
            "256_ObjectCategories/<NNN.name>/*.jpg",
            "https://data.caltech.edu/records/nyy15-4j048 (256_ObjectCategories.tar)",
        )
    items, labels, names = folder_of_classes(folder, skip=("257.clutter",))
    return _split_by(items, labels, names, test_fraction, seed)


def read_mit67(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """``Images/<class>/*.jpg`` (also under ``MIT67/``) with the official ``TrainImages.txt``/``TestImages.txt``."""
    folder = root / "MIT67" if (root / "MIT67").is_dir() else root
    if not (folder / "Images").is_dir():
        raise _missing(
            "MIT Indoor-67",
            root,
            "MIT67/Images/<class>/*.jpg and TrainImages.txt, TestImages.txt",
            "https://web.mit.edu/torralba/www/indoor.html",
        )
    names = [c.name for c in _class_folders(folder / "Images")]
    if split == "seeded":
        items, labels, names = folder_of_classes(folder / "Images")
        return _split_by(items, labels, names, test_fraction, seed)
    lists = []
    for name in ("TrainImages.txt", "TestImages.txt"):
        if not (folder / name).is_file():
            raise ConfigError(
                f"{folder / name} is missing (the official MIT-67 split from "
                "https://web.mit.edu/torralba/www/indoor.html), or set benchmark.split=seeded"
            )
        rel = [r.strip() for r in (folder / name).read_text().splitlines() if r.strip()]
        lists.append(([folder / "Images" / r for r in rel], np.asarray([names.index(r.split("/")[0]) for r in rel])))
    return FileSplit(lists[0][0], lists[0][1], lists[1][0], lists[1][1], names)


def _reference_or_seeded(what, folder, root, split, test_fraction, seed, files, resolve, where) -> FileSplit:
    if not folder.is_dir() or not _class_folders(folder):
        raise _missing(what, root, f"{folder.relative_to(root) if folder != root else '.'}/<class>/*.jpg", where)
    items, labels, names = folder_of_classes(folder)
    if split == "seeded":
        return _split_by(items, labels, names, test_fraction, seed)
    if not all((root / f).is_file() for f in files):
        raise ConfigError(
            f"the reference split of {what} is missing: put {files[0]} and {files[1]} (from {where}) "
            f"in {root}, or set benchmark.split=seeded"
        )
    (tr, ytr), (te, yte) = _read_reference_lists(root, *files, resolve)
    return FileSplit(tr, ytr, te, yte, names)


def read_resisc45(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """``NWPU-RESISC45/<class>/*.jpg``; the reference split from ``resisc45_{train,test}.yaml`` in the same folder."""
    folder = root / "NWPU-RESISC45" if (root / "NWPU-RESISC45").is_dir() else root
    return _reference_or_seeded(
        "NWPU-RESISC45",
        folder,
        folder,
        split,
        test_fraction,
        seed,
        ("resisc45_train.yaml", "resisc45_test.yaml"),
        lambda p: folder / p,
        "https://huggingface.co/datasets/aimagelab-ta/resisc45",
    )


def read_cropdiseases(root: Path, split: str, test_fraction: float, seed: int) -> FileSplit:
    """``images/<class>/*.jpg`` (also under ``cropdisease/``); the reference split from ``train.json``/``test.json``."""
    base = root / "cropdisease" if (root / "cropdisease").is_dir() else root
    return _reference_or_seeded(
        "CropDiseases",
        base / "images",
        base,
        split,
        test_fraction,
        seed,
        ("train.json", "test.json"),
        lambda p: base / "images" / p,
        "https://huggingface.co/datasets/aimagelab-ta/cropdisease",
    )
