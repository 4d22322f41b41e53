"""Continual streams of the hypernetwork teacher (:mod:`bench.teacher`) as Avalanche benchmarks.

Each experience is a set of module combinations (every combination with ``tasks_per_combination`` tasks;
with continuous combinations each task has its own code z on that support). For L > 1 generated layers a
stream's combination S is used in every layer. Streams (M modules, halves A = {0..⌊M/2⌋−1}, B = the rest):

============================  ==============================================================================
``teacher-connected``         experience e adds module e: {e} and {e−1, e} (experience 0: {0}); the support
                              is compositional and connected after every experience
``teacher-disconnected``      M experiences: the 1- and 2-hot combinations inside A, then inside B
``teacher-random``            a seeded 1 − ``ood_fraction`` of the pool in ``n_experiences`` experiences
``teacher-one-module``        experience m = the single module {m} (the task-arithmetic probe)
``teacher-noncomp``           as ``teacher-random`` with every combination using module M−1 held out
============================  ==============================================================================

Probe streams (named Avalanche streams next to ``train_stream``/``test_stream``): ``ood_stream``: held-out
combinations of trained modules — for the connected and disconnected streams the pairs in *neither* of their
supports, so both are scored on the same pool (the reference's rule); for one-module all pairs; for random and
noncomp the held-out fraction. ``noncomp_stream`` (noncomp only): the combinations that use module M−1.

Every experience carries its tasks (``experience.tasks``, a :class:`~bench.teacher.TaskSet`): the meta-learners
adapt on support sets and train on query sets from them. For the suite's other strategies an experience's
dataset holds the support and query points of its tasks (test stream: the held-out test points), with inputs
[x, context] — context is the task's code z flattened (``context: code``, the task identity a plain network
needs; the meta-learners never see it) or nothing (``context: none``) — and labels 8e + class, so that every
experience brings new classes (one head per experience, as the class-incremental strategies require).

``benchmark.extra_metrics(strategy)`` scores the trained strategy on the probes (see
:func:`~clcompose.bench.data.teacher_probes.teacher_metrics`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from clcompose.bench.data.benchmarks import BENCHMARKS, Benchmark
from clcompose.bench.data.teacher import (
    Combination,
    HyperTeacher,
    TaskSet,
    TeacherSpec,
    halves,
    is_compositional,
    is_connected,
    make_tasks,
    split_pool,
)
from clcompose.bench.data.teacher_probes import probe_accuracies, teacher_metrics
from clcompose.strategies.core.registry import ConfigError, Options


@dataclasses.dataclass
class TeacherOptions(Options):
    """Teacher sizes, task data per combination, and the streams' context and probe settings."""

    n_modules: int = 6
    k_hot: int = 2
    generated_layers: int = 1
    input_dim: int = 16
    output_dim: int = 8
    hidden_dim: int = 32
    temperature: float = 0.1
    continuous: bool = True
    tasks_per_combination: int = 8
    n_support: int = 64
    n_query: int = 64
    n_test: int = 64
    ood_fraction: float = 0.25
    n_experiences: int = 5  # random and noncomp streams, and the reference layout
    # connected/disconnected streams: "curriculum" (module sets below, tied across generated layers) or
    # "reference" (the reference's task supports of bench.teacher.split_pool, per-layer codes untied, in a
    # seeded order over n_experiences; both scored on the same pool of combinations in neither support)
    layout: Literal["curriculum", "reference"] = "curriculum"
    teacher_seed: int | None = None  # None: the stream seed (so each seed of a sweep has its own teacher)
    context: Literal["code", "none"] = "code"
    probe_steps: int = 100  # head-only few-shot adaptation of strategies without fast parameters
    probe_lr: float = 0.03

    def check(self) -> None:
        for name in (
            "n_modules",
            "k_hot",
            "generated_layers",
            "input_dim",
            "hidden_dim",
            "tasks_per_combination",
            "n_support",
            "n_query",
            "n_test",
            "n_experiences",
            "probe_steps",
        ):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.output_dim >= 2, "output_dim", "must be >= 2")
        self.require(2 <= self.k_hot <= self.n_modules, "k_hot", "must be between 2 and n_modules")
        self.require(self.n_modules >= 4, "n_modules", "must be >= 4")
        self.require(0 < self.ood_fraction < 1, "ood_fraction", "must be in (0, 1)")
        self.require(self.temperature > 0, "temperature", "must be > 0")
        self.require(self.probe_lr > 0, "probe_lr", "must be > 0")
        self.require(self.teacher_seed is None or self.teacher_seed >= 0, "teacher_seed", "must be >= 0")

    def spec(self, stream_seed: int = 0) -> TeacherSpec:
        seed = self.teacher_seed if self.teacher_seed is not None else stream_seed
        return TeacherSpec(
            self.input_dim,
            self.output_dim,
            self.hidden_dim,
            self.n_modules,
            self.k_hot,
            self.generated_layers,
            self.temperature,
            seed=seed,
        )


Sets = list[tuple[int, ...]]  # module sets (tied across generated layers)


def _subsets(modules, k_hot: int) -> Sets:
    return [c for h in range(1, k_hot + 1) for c in itertools.combinations(modules, h)]


def _chunks(items: list, n: int) -> list[list]:
    if n > len(items):
        raise ConfigError(f"cannot split {len(items)} combinations into {n} experiences")
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def stream_layout(stream: str, o: TeacherOptions, stream_seed: int) -> tuple[list[Sets], dict[str, Sets]]:
    """Module sets per training experience, and per probe stream (``ood``, ``noncomp``)."""
    m, k = o.n_modules, o.k_hot
    pairs = list(itertools.combinations(range(m), 2))
    a, b = halves(m)
    connected = [[(0,)]] + [[(e,), (e - 1, e)] for e in range(1, m)]
    disconnected_sets = sorted(_subsets(a, 2), key=lambda c: (max(c), len(c))) + sorted(
        _subsets(b, 2), key=lambda c: (max(c), len(c))
    )
    if stream in ("connected", "disconnected"):
        trained = {c for exp in connected for c in exp} | set(disconnected_sets)
        probes = {"ood": [p for p in pairs if p not in trained]}
        if stream == "connected":
            return connected, probes
        n_a = len(_subsets(a, 2))  # the halves differ in size for odd M
        return _chunks(disconnected_sets[:n_a], len(a)) + _chunks(disconnected_sets[n_a:], len(b)), probes
    if stream == "one-module":
        return [[(i,)] for i in range(m)], {"ood": [c for c in _subsets(range(m), k) if len(c) > 1]}
    if stream in ("random", "noncomp"):
        pool = _subsets(range(m), k)
        perm = np.random.default_rng(stream_seed).permutation(len(pool))
        n_ood = int(round(len(pool) * o.ood_fraction))
        shuffled = [pool[i] for i in perm]
        train, ood = shuffled[: len(pool) - n_ood], shuffled[len(pool) - n_ood :]
        probes = {"ood": ood}
        if stream == "noncomp":
            last = m - 1
            probes = {
                "ood": [c for c in ood if last not in c],
                "noncomp": sorted((c for c in pool if last in c), key=len),
            }
            train = [c for c in train if last not in c]
        return _chunks(train, o.n_experiences), probes
    raise ConfigError(f"unknown teacher stream {stream!r}")


def _tied(sets: Sets, layers: int) -> list[Combination]:
    return [tuple([s] * layers) for s in sets]


def combination_layout(
    stream: str, o: TeacherOptions, stream_seed: int
) -> tuple[list[list[Combination]], dict[str, list[Combination]]]:
    """Combinations (one code per generated layer) per training experience and per probe stream."""
    if o.layout == "reference" and stream in ("connected", "disconnected"):
        trained, ood = split_pool(o.n_modules, o.k_hot, o.generated_layers, stream)
        order = np.random.default_rng(stream_seed).permutation(len(trained))
        return _chunks([trained[i] for i in order], o.n_experiences), {"ood": ood}
    layout, probes = stream_layout(stream, o, stream_seed)
    return [_tied(s, o.generated_layers) for s in layout], {
        name: _tied(s, o.generated_layers) for name, s in probes.items()
    }


def _shown(c: Combination):
    """A combination for the record: its module set when every layer has the same, else one set per layer."""
    return list(c[0]) if all(code == c[0] for code in c) else [list(code) for code in c]


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


@dataclasses.dataclass
class TeacherStreams:
    """The generated tasks of one stream: per training experience, and per probe stream."""

    options: TeacherOptions
    experiences: list[TaskSet]
    probes: dict[str, TaskSet]

    def inputs(self, tasks: TaskSet, x: torch.Tensor) -> torch.Tensor:
        """[x, context] of the tasks' points (x: (N, n, D)) as the suite's plain networks see them."""
        if self.options.context == "none":
            return x
        ctx = tasks.z.reshape(len(tasks), 1, -1).expand(-1, x.shape[1], -1)
        return torch.cat([x, ctx], dim=-1)

    @property
    def input_dim(self) -> int:
        o = self.options
        return o.input_dim + (o.n_modules * o.generated_layers if o.context == "code" else 0)


def generate(stream: str, o: TeacherOptions, stream_seed: int) -> TeacherStreams:
    """Tasks of every experience and probe; the teacher and all task data depend on the teacher seed only (so
    every stream over the same teacher shares its tasks' data), the random split on ``stream_seed``. The
    teacher seed is ``teacher_seed``, or ``stream_seed`` when that is None."""
    spec = o.spec(stream_seed)
    teacher = HyperTeacher(spec)
    layout, probes = combination_layout(stream, o, stream_seed)

    def tasks(combos: list[Combination]) -> TaskSet:
        parts = [
            make_tasks(
                teacher, [c], o.tasks_per_combination, o.n_support, o.n_query, o.n_test, o.continuous, _seed(spec, c)
            )
            for c in combos
        ]
        return TaskSet.concat(parts)

    return TeacherStreams(o, [tasks(s) for s in layout], {name: tasks(s) for name, s in probes.items() if s})


def _dataset(x: torch.Tensor, y: torch.Tensor):
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    return _make_taskaware_tensor_classification_dataset(x, y, targets=y, task_labels=0)


@dataclasses.dataclass
class TeacherBenchmark(Benchmark):
    """A teacher stream: every experience carries its tasks (``experience.tasks``); the probes score a trained
    strategy after the stream (:meth:`extra_metrics`) and after every step (:meth:`step_metrics`)."""

    teacher: TeacherStreams | None = None

    def extra_metrics(self, strategy) -> dict[str, float | None]:
        return teacher_metrics(self.teacher, strategy)

    def step_metrics(self, strategy, trained: Sequence[int]) -> dict[str, float]:
        return probe_accuracies(self.teacher, strategy, trained)


def build_stream(stream: str, o: TeacherOptions, stream_seed: int | None) -> TeacherBenchmark:
    """The benchmark of a teacher stream, with ``experience.tasks`` and the probe metrics."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

    data = generate(stream, o, stream_seed or 0)
    n_out = o.output_dim

    def flat(tasks: TaskSet, part: str, offset: int):
        x, _, hard = getattr(tasks, part)()
        if part == "train":
            raise AssertionError
        return data.inputs(tasks, x).reshape(-1, data.input_dim), (hard + offset).reshape(-1)

    train, test = [], []
    for e, tasks in enumerate(data.experiences):
        (sx, sy), (qx, qy) = flat(tasks, "support", n_out * e), flat(tasks, "query", n_out * e)
        train.append(_dataset(torch.cat([sx, qx]), torch.cat([sy, qy])))
        test.append(_dataset(*flat(tasks, "test", n_out * e)))
    streams = {"train": train, "test": test}
    streams |= {name: [_dataset(*flat(t, "test", 0))] for name, t in data.probes.items()}
    scenario = with_classes_timeline(benchmark_from_datasets(**streams))
    # the few-shot learners read an experience's tasks (Avalanche experiences take extra attributes)
    for e, exp in enumerate(scenario.train_stream):
        exp.tasks = data.experiences[e]
    for e, exp in enumerate(scenario.test_stream):
        exp.tasks = data.experiences[e]
    for name, t in data.probes.items():
        for exp in getattr(scenario, f"{name}_stream"):
            exp.tasks = t
    trained = [c for t in data.experiences for c in t.combinations]
    info = {
        "dataset": f"teacher-{stream}",
        "input_dim": data.input_dim,
        "tasks_per_experience": [len(t) for t in data.experiences],
        "combinations_per_experience": [[_shown(c) for c in t.combinations] for t in data.experiences],
        "probes": {name: [_shown(c) for c in t.combinations] for name, t in data.probes.items()},
        "compositional": is_compositional(trained, o.n_modules, o.generated_layers),
        "connected": is_connected(trained, o.n_modules, o.generated_layers),
    }
    return TeacherBenchmark(scenario, info, teacher=data)


for _stream, _summary in [
    ("connected", "Hypernetwork teacher: connected curriculum, experience e adds module e ({e}, {e-1,e})."),
    ("disconnected", "Hypernetwork teacher: modules of one half, then of the other (disconnected support)."),
    ("random", "Hypernetwork teacher: random i.i.d. combinations in n_experiences, ood_fraction held out."),
    ("one-module", "Hypernetwork teacher: one single-module task per experience (task-arithmetic probe)."),
    ("noncomp", "Hypernetwork teacher: non-compositional control, module M-1 never trained (noncomp probe)."),
]:

    def _build(options: TeacherOptions, stream_seed: int | None, _s=_stream):
        return build_stream(_s, options, stream_seed)

    def _check(options: TeacherOptions, _s=_stream) -> None:  # at resolve time: e.g. too many experiences
        combination_layout(_s, options, 0)  # the number of combinations per experience does not depend on the seed

    _build.__doc__ = _summary
    _build.check_options = _check
    BENCHMARKS.register(f"teacher-{_stream}", TeacherOptions)(_build)
