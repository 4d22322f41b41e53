"""Task arithmetic: independent fine-tuning of τ_t from θ0 per experience, no regulariser.

Composed by ``sum`` θ0 + λ Σ τ_t by default, λ chosen by :class:`LambdaSelection` on validation data held out
of the training experiences (never the test stream), or by any other rule of :mod:`.composition` (``average``
θ0 + (1/T) Σ τ_t, ``ties``, ``magmax``, ``fisher``, ``tangent``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.composition import LambdaSelection
from clcompose.strategies.task_vectors.options import TaskArithmeticOptions

__all__ = ["LambdaSelection", "TaskArithmetic", "task_arithmetic"]


class TaskArithmetic(TaskVectorStrategy):
    """Task arithmetic: independent τ_t from θ0, no regulariser; composed by a validated λ-sum (or any rule)."""

    method = "ta"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: TaskArithmeticOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else TaskArithmeticOptions()
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    @property
    def selection(self) -> LambdaSelection | None:
        """The λ (and density) selection plugin, when the composition has a hyperparameter."""
        return next((p for p in self.composition_plugins if isinstance(p, LambdaSelection)), None)


@STRATEGIES.register("task-arithmetic", TaskArithmeticOptions)
def task_arithmetic(
    model, options: TaskArithmeticOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Task arithmetic: independent τ_t from θ0, no regulariser; sum with validated λ, or any composition rule."""
    return TaskArithmetic(
        model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins
    )
