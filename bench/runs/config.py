"""What determines a run: :class:`RunConfig` (names and raw options), validated into :class:`ResolvedRun`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Literal

from clcompose.strategies.core.registry import ConfigError, Options

SECTIONS = ("benchmark", "backbone", "strategy", "train")
SEED_LIMIT = 2**32  # NumPy seeds (np.random.seed) must be below 2**32
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")
LOGGERS = ("tensorboard", "csv", "wandb", "text")


@dataclasses.dataclass
class LoggerOptions(Options):
    """``train.loggers``: Avalanche loggers that write under the run folder. They observe the run and change
    nothing in it, so they are not part of the run's identity (its config hash) nor of the record's config."""

    loggers: list[Literal["tensorboard", "csv", "wandb", "text"]] = dataclasses.field(default_factory=list)
    # checkpoints inside an experience every N minutes (0: at every mini-batch; None: only between experiences);
    # like the loggers, it changes nothing in the run (a resumed run is bit-identical), so it is not hashed
    checkpoint_every_min: float | None = None

    def _where(self, name: str) -> str:
        return f"train.{name}"

    def check(self) -> None:
        self.require(len(set(self.loggers)) == len(self.loggers), "loggers", "must not name a logger twice")
        every = self.checkpoint_every_min
        self.require(every is None or every >= 0, "checkpoint_every_min", "must be >= 0")


@dataclasses.dataclass
class RunConfig:
    """Everything that determines a run. ``*_options`` are validated against the named component's options."""

    benchmark: str = "split-fmnist"
    backbone: str = "efficientnet-lite0"
    strategy: str = "naive"
    seed: int = 0  # training seed: initialisation, data order, sampling
    stream_seed: int = 0  # class order and training subsample
    benchmark_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    backbone_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    strategy_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    threads: int | None = 1  # torch intra-op threads; None keeps torch's default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a run config must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown run config key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        cfg = cls(**data)
        for key in ("seed", "stream_seed"):
            value = getattr(cfg, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
            if value >= SEED_LIMIT:
                raise ConfigError(f"{key} must be below 2**32 = {SEED_LIMIT} (NumPy's seed range), got {value}")
        if not isinstance(cfg.device, str) or not DEVICE.match(cfg.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N, mps or xpu[:N], got {cfg.device!r}")
        for key in ("benchmark_options", "backbone_options", "strategy_options", "train"):
            if not isinstance(getattr(cfg, key), dict):
                raise ConfigError(f"{key} must be a mapping, got {getattr(cfg, key)!r}")
        if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
            raise ConfigError(f"threads must be a positive integer or null, got {cfg.threads!r}")
        return cfg

    def resolve(self) -> ResolvedRun:
        """Look up every name and validate every option (cheap: imports the registries, builds nothing)."""
        from clcompose.bench.data.benchmarks import BENCHMARKS
        from clcompose.bench.models.backbones import BACKBONES
        from clcompose.strategies.core.registry import STRATEGIES
        from clcompose.strategies.core.training import TrainConfig

        train = dict(self.train)
        loggers = LoggerOptions.from_dict({k: train.pop(k) for k in LoggerOptions.field_names() if k in train})
        entry = BENCHMARKS[self.benchmark]
        benchmark = entry.options.from_dict(self.benchmark_options, f"benchmark {self.benchmark!r}")
        check = getattr(entry.factory, "check_options", None)  # limits that depend on the data, e.g. its classes
        if check is not None:
            try:
                check(benchmark)
            except ConfigError as exc:
                raise ConfigError(f"benchmark {self.benchmark!r}: {exc}") from None
        return ResolvedRun(
            config=self,
            benchmark=benchmark,
            backbone=BACKBONES[self.backbone].options.from_dict(self.backbone_options, f"backbone {self.backbone!r}"),
            strategy=STRATEGIES[self.strategy].options.from_dict(self.strategy_options, f"strategy {self.strategy!r}"),
            train=_train_config(TrainConfig, train),
            loggers=list(loggers.loggers),
            checkpoint_every_min=loggers.checkpoint_every_min,
        )


def _train_config(cls: type[Options], train: dict[str, Any]) -> Options:
    try:
        return cls.from_dict(train, "train")
    except ConfigError as exc:
        if str(exc).startswith("unknown option"):
            raise ConfigError(f"{exc}, loggers, checkpoint_every_min") from None  # taken out before TrainConfig
        raise


@dataclasses.dataclass
class ResolvedRun:
    """A validated run. ``loggers`` (from ``train.loggers``) only observe the run: :meth:`to_dict`, which the
    record stores as its config and the run id hashes, leaves them out."""

    config: RunConfig
    benchmark: Options
    backbone: Options
    strategy: Options
    train: Options
    loggers: list[str] = dataclasses.field(default_factory=list)
    checkpoint_every_min: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The full config with every default filled in (what a record stores and its id hashes)."""
        c = self.config
        return {
            "benchmark": c.benchmark,
            "backbone": c.backbone,
            "strategy": c.strategy,
            "seed": c.seed,
            "stream_seed": c.stream_seed,
            "benchmark_options": self.benchmark.to_dict(),
            "backbone_options": self.backbone.to_dict(),
            "strategy_options": self.strategy.to_dict(),
            "train": self.train.to_dict(),
            "device": c.device,
            "threads": c.threads,
        }

    def run_id(self) -> str:
        c = self.config
        digest = config_hash(self.to_dict())
        return f"{c.benchmark}_{c.backbone}_{c.strategy}_s{c.seed}_{digest[:10]}"


def config_hash(config: dict[str, Any]) -> str:
    """Stable content hash of a resolved config (key order and float formatting do not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
