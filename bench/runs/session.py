"""What one run trains: the benchmark stream, the backbone, the strategy and its evaluator (with the loggers of
``train.loggers``), built from a resolved config; and the accuracy row read from an evaluation."""

from __future__ import annotations

import dataclasses
import random
import re
import sys
from pathlib import Path
from typing import Any

from clcompose.bench.runs.config import ResolvedRun


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/(?:Task\d+/)?Exp(\d+)$")


def accuracy_row(metrics: dict[str, Any], n_experiences: int) -> list[float]:
    """Per-experience test accuracies from Avalanche's ``eval`` result dict."""
    row: dict[int, float] = {}
    for key, value in metrics.items():
        m = _ACC_KEY.match(key)
        if m:
            row[int(m.group(1))] = float(value)
    missing = [i for i in range(n_experiences) if i not in row]
    if missing:
        raise RuntimeError(f"evaluation returned no accuracy for experiences {missing}")
    return [row[i] for i in range(n_experiences)]


def _evaluator(resolved: ResolvedRun | None = None, log_dir: Path | None = None, attempt: int = 1):
    """Avalanche's evaluator of a run: accuracy per experience (what the record needs), or with
    ``train.loggers`` and a ``log_dir`` the :mod:`~clcompose.bench.runs.loggers` evaluator and loggers."""
    import warnings

    if resolved is not None and resolved.loggers and log_dir is not None:
        from clcompose.bench.runs import loggers

        return loggers.evaluator(resolved.loggers, log_dir, resolved.run_id(), resolved.to_dict(), attempt)

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": the record is our log
        return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


@dataclasses.dataclass
class _Session:
    """What a run trains: the built benchmark and strategy, and the training steps (one per experience, or one for joint)."""

    benchmark: Any
    strategy: Any
    test_stream: Any
    steps: list[list[Any]]
    n_experiences: int
    loggers: list[Any] = dataclasses.field(default_factory=list)

    @classmethod
    def build(
        cls, resolved: ResolvedRun, progress: bool = True, log_dir: Path | None = None, attempt: int = 1
    ) -> _Session:
        evaluator = _evaluator(resolved, log_dir, attempt)  # first: starting loggers must not move a seeded RNG
        loggers = list(getattr(evaluator, "loggers", []))
        try:
            return cls._build(resolved, progress, evaluator, loggers)
        except BaseException:
            _close_loggers(loggers)
            raise

    @classmethod
    def _build(cls, resolved: ResolvedRun, progress: bool, evaluator: Any, loggers: list[Any]) -> _Session:
        from avalanche.training import JointTraining

        from clcompose.bench.data.benchmarks import build_benchmark
        from clcompose.bench.models.backbones import build_backbone, pretrain_small_cnn
        from clcompose.strategies.core.heads import ClassIncrementalNet
        from clcompose.strategies.core.registry import STRATEGIES

        cfg = resolved.config
        if not progress and cfg.backbone == "small-cnn" and getattr(resolved.backbone, "pretrained", False):
            pretrain_small_cnn(resolved.backbone, progress=False)  # --quiet: pre-train (or find) it without a bar
        seed_everything(cfg.seed)
        bm = build_benchmark(cfg.benchmark, resolved.benchmark, cfg.stream_seed)
        backbone_options = resolved.backbone
        if getattr(backbone_options, "in_features", 0) is None and "input_dim" in bm.info:
            backbone_options = dataclasses.replace(
                backbone_options, in_features=bm.info["input_dim"]
            )  # a copy: the config stays as given
        backbone = build_backbone(cfg.backbone, backbone_options)
        seed_everything(cfg.seed)  # the same state whether the backbone came from the cache or was just built
        model = ClassIncrementalNet(backbone)
        strategy = STRATEGIES[cfg.strategy].factory(
            model, resolved.strategy, resolved.train, evaluator=evaluator, device=cfg.device
        )
        if loggers and getattr(strategy, "evaluator", None) is not evaluator:
            print(
                f"bench: warning: strategy {cfg.strategy} does not report to Avalanche's evaluator; "
                f"train.loggers ({', '.join(resolved.loggers)}) log nothing for it",
                file=sys.stderr,
            )
        train_stream = list(bm.train_stream)
        steps = [train_stream] if isinstance(strategy, JointTraining) else [[e] for e in train_stream]
        return cls(bm, strategy, bm.test_stream, steps, len(train_stream), loggers)

    def seen(self, step: int) -> None:
        """Tell a logging evaluator which experiences are trained once step ``step`` is (their test loss is logged)."""
        evaluator = getattr(self.strategy, "evaluator", None)
        if hasattr(evaluator, "seen_experiences"):
            evaluator.seen_experiences = {e.current_experience for s in self.steps[: step + 1] for e in s}

    def close(self) -> None:
        _close_loggers(self.loggers)
        self.loggers = []


def _close_loggers(loggers: list[Any]) -> None:
    if loggers:
        from clcompose.bench.runs.loggers import close

        close(loggers)
