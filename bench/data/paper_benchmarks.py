"""The paper's seven class-incremental image benchmarks (and ``split-imagefolder``) from a ``data_root``.

Each reads its documented folder layout (:mod:`~clcompose.bench.data.image_folders`), loads images lazily,
and applies the reference's train/test transforms (:mod:`~clcompose.bench.data.image_transforms`) through
Avalanche's transform groups, so the training augmentation is visible to the strategies (ITA/IEL then recompute
θ0 features every probing epoch, as the reference does). Experiences follow the reference's class order (the
data set's label order, ``class_order=fixed``) or a permutation drawn from ``stream_seed`` (``seeded``).

| name | reference | tasks × classes | layout under data_root |
|---|---|---|---|
| split-cifar100-224 | seq-cifar100-224 | 10 × 10 | cifar-100-python/ |
| split-imagenet-r | seq-imagenet-r | 10 × 20 | imagenet-r/ + the reference's split files |
| split-cub200 | seq-cub200 | 10 × 20 | CUB_200_2011/ |
| split-caltech256 | (none) | 10 × 25.6 | 256_ObjectCategories/ |
| split-mit67 | seq-mit67 | 10 (7 × 7 + 3 × 6) | MIT67/Images + TrainImages.txt, TestImages.txt |
| split-resisc45 | seq-resisc45 | 9 × 5 | NWPU-RESISC45/ + resisc45_{train,test}.yaml |
| split-cropdiseases | seq-cropdisease | 7 × 5 | cropdisease/images + train.json, test.json |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from clcompose.bench.data import image_folders as F
from clcompose.bench.data.benchmarks import (
    BENCHMARKS,
    Benchmark,
    class_order,
    classes_per_experience,
    subsample_per_class,
)
from clcompose.bench.data.image_transforms import Recipe, TestRecipe, TrainRecipe, eval_transform, train_transform
from clcompose.strategies.core.registry import ConfigError, Options


@dataclasses.dataclass
class ImageStreamOptions(Options):
    """A folder image data set as a class-incremental stream (lazy loading, the reference's transforms)."""

    data_root: str | None = None  # None: $BENCH_DATA_ROOT
    n_experiences: int | None = None  # None: the reference's number of tasks
    image_size: int = 224
    train_transform: TrainRecipe = "reference"  # reference: the data set's own (see image_transforms)
    test_transform: TestRecipe = "reference"
    split: Literal["reference", "seeded"] = "reference"  # seeded: per-class test_fraction drawn from split_seed
    test_fraction: float = 0.2
    split_seed: int = 0
    class_order: Literal["fixed", "seeded"] = "fixed"  # fixed: label order, as the reference; seeded: stream_seed
    per_class: int | None = None  # training images kept per class (None: all)
    test_per_class: int | None = None

    def check(self) -> None:
        self.require(self.n_experiences is None or self.n_experiences >= 1, "n_experiences", "must be >= 1")
        self.require(self.image_size >= 8, "image_size", "must be >= 8")
        self.require(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        self.require(self.split_seed >= 0, "split_seed", "must be >= 0")
        self.require(self.per_class is None or self.per_class >= 1, "per_class", "must be >= 1")
        self.require(self.test_per_class is None or self.test_per_class >= 1, "test_per_class", "must be >= 1")


@dataclasses.dataclass
class ImageFolderOptions(ImageStreamOptions):
    """Any folder of class folders (or train/ and test/ folders of them); ``data_root`` is required."""

    n_experiences: int | None = 5
    train_transform: TrainRecipe = "rrc"
    test_transform: TestRecipe = "center"
    class_order: Literal["fixed", "seeded"] = "seeded"


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """What the suite knows about a folder data set without reading it."""

    reader: Callable[..., F.FileSplit]
    n_tasks: int
    num_classes: int | None  # None: known only from the folder (split-imagefolder)
    recipe: Recipe = Recipe()


PAPER_DATASETS = {
    "split-cifar100-224": ImageDataset(F.read_cifar100, 10, 100, Recipe("rrc", "center")),
    "split-imagenet-r": ImageDataset(F.read_imagenet_r, 10, 200, Recipe("rrc", "center", test_resize=(256, 256))),
    "split-cub200": ImageDataset(F.read_cub200, 10, 200, Recipe("resize-crop", "center", train_resize=(300, 300))),
    "split-caltech256": ImageDataset(F.read_caltech256, 10, 256, Recipe("rrc", "center")),
    "split-mit67": ImageDataset(F.read_mit67, 10, 67, Recipe("resize-crop", "center", train_resize=256)),
    "split-resisc45": ImageDataset(F.read_resisc45, 9, 45, Recipe("rrc", "center", test_resize=(256, 256))),
    "split-cropdiseases": ImageDataset(F.read_cropdiseases, 7, 35, Recipe("rrc", "resize")),
}


def data_root(options: ImageStreamOptions, name: str) -> Path:
    root = options.data_root or os.environ.get("BENCH_DATA_ROOT")
    if not root:
        raise ConfigError(
            f"benchmark {name!r} needs benchmark.data_root (or $BENCH_DATA_ROOT): the folder with its data"
        )
    return Path(root).expanduser()


def avalanche_dataset(items: list, labels: np.ndarray, train_tf, eval_tf, group: str):
    """An Avalanche classification dataset with the train/eval transform groups (lazy: items are paths)."""
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    return _make_taskaware_classification_dataset(
        F.ImageItems(items, labels),
        transform_groups={"train": (train_tf, None), "eval": (eval_tf, None)},
        initial_transform_group=group,
        targets=[int(y) for y in labels],
    )


def build_image_stream(name: str, spec: ImageDataset, options: ImageStreamOptions, stream_seed: int | None):
    """Read the layout, subsample, and cut the stream into ``n_experiences`` (the reference's by default)."""
    from avalanche.benchmarks import class_incremental_benchmark

    root = data_root(options, name)
    split = spec.reader(root, options.split, options.test_fraction, options.split_seed)
    n_classes = len(split.class_names)
    if len(split.train_items) == 0 or len(set(split.train_labels.tolist())) != n_classes:
        raise ConfigError(f"benchmark {name!r}: some of the {n_classes} classes under {root} have no training image")
    if spec.num_classes is not None and n_classes != spec.num_classes:
        raise ConfigError(f"benchmark {name!r}: expected {spec.num_classes} classes under {root}, found {n_classes}")
    rng = np.random.default_rng(stream_seed if stream_seed is not None else 0)
    tr = subsample_per_class(split.train_labels, options.per_class, rng)
    te = subsample_per_class(split.test_labels, options.test_per_class, np.random.default_rng(0))
    size, test_name = options.image_size, options.test_transform
    eval_tf = eval_transform(spec.recipe, test_name, size)
    train_tf = train_transform(spec.recipe, options.train_transform, test_name, size)
    train = avalanche_dataset([split.train_items[i] for i in tr], split.train_labels[tr], train_tf, eval_tf, "train")
    test = avalanche_dataset([split.test_items[i] for i in te], split.test_labels[te], train_tf, eval_tf, "eval")
    order = class_order(n_classes, stream_seed if options.class_order == "seeded" else None)
    n_exp = options.n_experiences or spec.n_tasks
    scenario = class_incremental_benchmark(
        {"train": train, "test": test}, class_order=order, num_classes_per_exp=classes_per_experience(n_classes, n_exp)
    )
    info = {
        "dataset": name,
        "data_root": str(root),
        "class_order": order,
        "class_names": split.class_names,
        "train_size": int(len(tr)),
        "test_size": int(len(te)),
        "image_shape": [3, size, size],
        "split": options.split,
        "transforms": {"train": repr(train_tf), "test": repr(eval_tf)},
    }
    return Benchmark(scenario, info)


def _register(name: str, spec: ImageDataset, options: type[ImageStreamOptions], summary: str) -> None:
    def build(opts: ImageStreamOptions, stream_seed: int | None):
        return build_image_stream(name, spec, opts, stream_seed)

    def check_options(opts: ImageStreamOptions) -> None:
        if spec.num_classes is not None:
            classes_per_experience(spec.num_classes, opts.n_experiences or spec.n_tasks)

    build.__doc__ = summary
    build.check_options = check_options
    BENCHMARKS.register(name, options)(build)


for _name, _summary in [
    ("split-cifar100-224", "Split CIFAR-100 at 224 px from data_root/cifar-100-python (10 × 10, the paper's)."),
    ("split-imagenet-r", "Split ImageNet-R from data_root/imagenet-r + the reference split files (10 × 20)."),
    ("split-cub200", "Split CUB-200-2011 from data_root/CUB_200_2011, official split (10 × 20)."),
    ("split-caltech256", "Split Caltech-256 from data_root/256_ObjectCategories, seeded 80/20 split (10 tasks)."),
    ("split-mit67", "Split MIT Indoor-67 from data_root/MIT67, official split (10 tasks: 7 × 7 + 3 × 6)."),
    ("split-resisc45", "Split NWPU-RESISC45 from data_root/NWPU-RESISC45 + the reference split files (9 × 5)."),
    ("split-cropdiseases", "Split CropDiseases from data_root/cropdisease + the reference split files (7 × 5)."),
]:
    _register(_name, PAPER_DATASETS[_name], ImageStreamOptions, _summary)

_register(
    "split-imagefolder",
    ImageDataset(F.read_imagefolder, 5, None, Recipe("rrc", "center")),
    ImageFolderOptions,
    "Any folder of class folders (or train/ and test/) from data_root; seeded split without test/.",
)
