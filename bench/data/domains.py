"""Task-labelled domain streams: one offline data set seen under a sequence of deterministic transforms.

Experience t shows the source images under domain t (a rotation, a shear, inversion, noise, …) with Avalanche
task label t; its classes get their own labels t·K + c (K source classes), so task-aware models keep one head
per domain and task-agnostic ones must tell the domains apart too. One more domain can be held out of the
stream (``heldout``) for transfer experiments: it is built the same way (task label T) and attached to the
benchmark as ``benchmark.heldout``, never trained on by the stream.

Domain grammar: atoms joined by ``+`` and applied left to right — ``identity``, ``invert`` (1 − x), ``flip``
(left–right), ``rot<degrees>``, ``shear<factor>`` (horizontal), ``scale<factor>`` (zoom about the centre),
``noise<std>`` (Gaussian noise, clipped to [0, 1], drawn from a generator seeded by the domain's name, so
the same domain always gets the same noise). Images are resampled bilinearly with zero padding.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import numpy as np

from clcompose.bench.data.benchmarks import BENCHMARKS, Benchmark, subsample_per_class
from clcompose.bench.data.datasets import DATASETS, images_as_float, load_dataset
from clcompose.strategies.core.protocols import HeldOutTask
from clcompose.strategies.core.registry import ConfigError, Options

ATOMS = "identity, invert, flip, rot<degrees>, shear<factor>, scale<factor>, noise<std>"
_NUMBER = r"(-?\d+(?:\.\d+)?)"


@dataclasses.dataclass
class DomainStreamOptions(Options):
    """A data set under a sequence of deterministic transforms, one experience (and task label) per domain."""

    source: str = "mnist5k"  # a data set name from bench.datasets
    domains: list[str] = dataclasses.field(
        default_factory=lambda: ["identity", "rot30", "rot60", "invert", "invert+rot30"]
    )
    heldout: str | None = "rot45"  # a domain kept out of the stream for transfer experiments (None: none)
    per_class: int | None = 50  # training images per class and domain (each domain draws its own)
    test_per_class: int | None = 50  # test images per class (the same images under every domain)
    data_root: str | None = None
    download: bool = False

    def check(self) -> None:
        self.require(len(self.domains) >= 1, "domains", "must name at least one domain")
        self.require(len(set(self.domains)) == len(self.domains), "domains", "must not repeat a domain")
        self.require(self.per_class is None or self.per_class >= 1, "per_class", "must be >= 1")
        self.require(self.test_per_class is None or self.test_per_class >= 1, "test_per_class", "must be >= 1")
        for domain in list(self.domains) + ([self.heldout] if self.heldout else []):
            parse_domain(domain)
        self.require(self.heldout not in self.domains, "heldout", "must not be one of the stream's domains")
        self.require(self.source in DATASETS, "source", f"must be one of {', '.join(DATASETS.names())}")


def parse_domain(domain: str) -> list[tuple[str, float | None]]:
    """``"rot30+invert"`` → ``[("rot", 30.0), ("invert", None)]``; a bad atom is a one-line ConfigError."""
    atoms = []
    for atom in str(domain).split("+"):
        atom = atom.strip()
        if atom in ("identity", "invert", "flip"):
            atoms.append((atom, None))
            continue
        m = re.fullmatch(r"(rot|shear|scale|noise)" + _NUMBER, atom)
        if not m:
            raise ConfigError(f"unknown domain transform {atom!r} in {domain!r}; valid atoms: {ATOMS}")
        kind, value = m.group(1), float(m.group(2))
        if kind == "scale" and value <= 0 or kind == "noise" and value < 0:
            raise ConfigError(f"domain transform {atom!r} needs a positive {'factor' if kind == 'scale' else 'std'}")
        atoms.append((kind, value))
    return atoms


def _affine(x: np.ndarray, matrix: list[list[float]]) -> np.ndarray:
    """Resample images (N, C, H, W) with the 2×3 affine map (normalised coordinates) from output to input."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(x)
    theta = torch.tensor(matrix, dtype=t.dtype).expand(len(t), 2, 3)
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False).numpy()


def transform_images(x: np.ndarray, domain: str, salt: int = 0) -> np.ndarray:
    """Apply ``domain`` to float images in [0, 1] (N, C, H, W); deterministic for a given (domain, salt)."""
    x = images_as_float(x)
    for kind, value in parse_domain(domain):
        if kind == "invert":
            x = 1.0 - x
        elif kind == "flip":
            x = x[..., ::-1].copy()
        elif kind == "rot":
            a = math.radians(value)  # output pixel p samples the input at R(−a) p: the image turns by +a
            x = _affine(x, [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
        elif kind == "shear":
            x = _affine(x, [[1.0, value, 0.0], [0.0, 1.0, 0.0]])
        elif kind == "scale":
            x = _affine(x, [[1.0 / value, 0.0, 0.0], [0.0, 1.0 / value, 0.0]])
        elif kind == "noise":
            rng = np.random.default_rng([zlib.crc32(domain.encode()), salt])
            x = np.clip(x + value * rng.standard_normal(x.shape).astype(np.float32), 0.0, 1.0)
    return np.ascontiguousarray(x, dtype=np.float32)


def _task_dataset(x: np.ndarray, y: np.ndarray, task: int):
    import torch
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    ds.targets = torch.from_numpy(y)
    return _make_taskaware_classification_dataset(ds, task_labels=task)


@BENCHMARKS.register("domains", DomainStreamOptions)
def domain_stream(options: DomainStreamOptions, stream_seed: int | None):
    """Domain stream with task labels: a data set under rotations, shear, inversion, noise (one experience each)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    data = load_dataset(options.source, options.data_root, options.download)
    k = data.num_classes
    te = subsample_per_class(data.y_test, options.test_per_class, np.random.default_rng(0))
    seed = stream_seed if stream_seed is not None else 0

    def build(task: int, domain: str):
        tr = subsample_per_class(data.y_train, options.per_class, np.random.default_rng([seed, task]))
        train = _task_dataset(transform_images(data.x_train[tr], domain, 2 * task), data.y_train[tr] + task * k, task)
        test = _task_dataset(transform_images(data.x_test[te], domain, 2 * task + 1), data.y_test[te] + task * k, task)
        return train, test, len(tr)

    parts = [build(t, d) for t, d in enumerate(options.domains)]
    scenario = with_classes_timeline(
        with_task_labels(benchmark_from_datasets(train=[p[0] for p in parts], test=[p[1] for p in parts]))
    )
    info = {
        "dataset": f"{data.name} domains",
        "domains": list(options.domains),
        "class_order": list(range(k * len(options.domains))),
        "class_names": [f"{d}:{c}" for d in options.domains for c in data.class_names],
        "task_labels": True,
        "train_size": int(sum(p[2] for p in parts)),
        "test_size": int(len(te) * len(options.domains)),
        "image_shape": list(data.x_train.shape[1:]),
        "data_digest": data.digest(),
    }
    heldout = None
    if options.heldout:
        t = len(options.domains)
        train, test, _ = build(t, options.heldout)
        heldout = HeldOutTask(domain=options.heldout, task_label=t, train=train, test=test)
        info["heldout"] = options.heldout
    return Benchmark(scenario, info, heldout)
