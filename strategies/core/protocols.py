"""Typed protocols for what benchmarks and strategies offer each other, beyond Avalanche's own interfaces.

A run loop (the suite's ``bench run``, or a user's own loop) checks these with ``isinstance`` instead of probing
attributes; each hook is optional, and an object offers it by having the methods.

Strategy side:

- :class:`RecordsExtras` — ``record_extras()``: diagnostics stored next to the metrics of a run;
- :class:`SavesArtifacts` — ``save_artifacts(folder)``: files written next to the record (e.g. task vectors);
- :class:`FinalMetrics` — ``final_metrics(benchmark)``: scalar metrics after the stream (e.g. transfer to a
  task the benchmark held out);
- :class:`FewShotLearner` — few-shot adaptation of fast parameters on task sets (the meta-learners);
- :class:`ComposesTaskVectors` — a network θ0 + Σ_t c_t τ_t whose features can be taken at any coefficients.

Benchmark side:

- :class:`OffersHeldOutTask` — ``heldout``: a task kept out of the stream (:class:`HeldOutTask`);
- :class:`ExtraMetrics` — ``extra_metrics(strategy)``: scalars of the trained strategy (e.g. on probe streams);
- :class:`StepMetrics` — ``step_metrics(strategy, trained)``: scalars after every training step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict, runtime_checkable

import torch


@runtime_checkable
class RecordsExtras(Protocol):
    def record_extras(self) -> dict[str, Any]:
        """JSON-serialisable diagnostics of the run (stored under ``strategy_extras``)."""


@runtime_checkable
class SavesArtifacts(Protocol):
    def save_artifacts(self, folder: Path) -> list[str]:
        """Write files next to the record; returns their names."""


@runtime_checkable
class FinalMetrics(Protocol):
    def final_metrics(self, benchmark: Any) -> dict[str, float | None]:
        """Scalar metrics computed after the stream; must not change what later steps would see."""


class HeldOutTask(TypedDict):
    """A task a benchmark keeps out of its stream (e.g. a held-out domain for transfer)."""

    domain: str
    task_label: int
    train: Any  # an Avalanche classification dataset
    test: Any


@runtime_checkable
class OffersHeldOutTask(Protocol):
    heldout: HeldOutTask | None


@runtime_checkable
class ExtraMetrics(Protocol):
    def extra_metrics(self, strategy: Any) -> dict[str, float | None]:
        """Scalar metrics of the trained strategy (merged into the run's metrics)."""


@runtime_checkable
class StepMetrics(Protocol):
    def step_metrics(self, strategy: Any, trained: Sequence[int]) -> dict[str, float]:
        """Scalars after a training step; ``trained`` lists the experience indices trained so far."""


@runtime_checkable
class FewShotLearner(Protocol):
    """A learner that adapts fast parameters on each task's support set (tasks: a ``TaskSet``)."""

    def adapt_tasks(self, tasks: Any, initial: bool = False) -> Any:
        """Adapt on every task's support set and score its test points (``initial``: from the untrained learner);
        returns an object with ``accuracy``, ``loss`` and ``fast`` (the adapted fast parameters, one row per task)."""

    def mean_adapted(self, tasks: Any) -> dict[str, torch.Tensor]:
        """The fast parameters adapted on each task's support set, averaged over the tasks."""

    def initial_fast(self) -> dict[str, torch.Tensor]:
        """The meta-learned initialisation of the fast parameters."""

    def predict_with(self, fast: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of inputs under given fast parameters, without adaptation."""


@runtime_checkable
class ComposesTaskVectors(Protocol):
    """A strategy whose network is θ0 + Σ_t c_t τ_t over one task vector per trained experience."""

    def task_vector_count(self) -> int:
        """The number of task vectors trained so far."""

    def features_at(self, coefficients: Sequence[float] | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The backbone's features at θ0 + Σ_t c_t τ_t (``None``: at θ0 itself)."""
