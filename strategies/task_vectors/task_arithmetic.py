"""Task arithmetic: independent fine-tuning of τ_t from θ0 per experience, no regulariser.

Composition by ``average`` (θ0 + (1/T) Σ τ_t) or by ``sum`` θ0 + λ Σ τ_t, with λ chosen by
:class:`LambdaSelection` on validation data held out of the training experiences (never the test stream).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.options import TaskArithmeticOptions


class LambdaSelection(SupervisedPlugin):
    """Holds out ``val_fraction`` of every training experience and, after each, sets the composition
    θ0 + λ Σ_t τ_t of a task-vector strategy to the λ of ``grid`` with the best accuracy on the held-out data of
    all experiences seen so far (ties: the first in ``grid``)."""

    def __init__(self, grid: Sequence[float], val_fraction: float):
        super().__init__()
        self.grid, self.val_fraction = list(grid), val_fraction
        self.val_sets: list = []
        self.rows: list[dict] = []

    def after_train_dataset_adaptation(self, strategy, *args, **kwargs):
        n = len(strategy.adapted_dataset)
        n_val = max(1, int(round(n * self.val_fraction)))
        perm = torch.randperm(n).tolist()
        self.val_sets.append(strategy.adapted_dataset.subset(perm[:n_val]))
        strategy.adapted_dataset = strategy.adapted_dataset.subset(perm[n_val:])

    @torch.no_grad()
    def after_training_exp(self, strategy, *args, **kwargs):
        model, device = strategy.model, strategy.device
        data = [(x.to(device), y.to(device)) for ds in self.val_sets for x, y, *_ in strategy.loader(ds)]
        was_training = model.training
        model.eval()
        best, best_acc = None, -1.0
        for lam in self.grid:
            model.coefficients = [lam] * model.pool.num_tasks
            model.invalidate()
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
            acc = correct / max(1, sum(len(y) for _, y in data))
            if acc > best_acc:
                best, best_acc = lam, acc
        model.train(was_training)
        model.coefficients = [best] * model.pool.num_tasks
        model.invalidate()
        n_val = sum(len(y) for _, y in data)
        self.rows.append(
            {"experience": model.pool.num_tasks - 1, "lambda": best, "val_accuracy": best_acc, "val_examples": n_val}
        )


class TaskArithmetic(TaskVectorStrategy):
    """Task arithmetic: independent τ_t from θ0, no regulariser; composed by average or by a validated λ-sum."""

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
        self.selection = (
            LambdaSelection(options.lambda_grid, options.val_fraction) if options.composition == "sum" else None
        )
        plugins = [*plugins, self.selection] if self.selection is not None else list(plugins)
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    def record_extras(self) -> dict:
        return super().record_extras() | {
            "lambda": (self.selection.rows or None) if self.selection is not None else None
        }


@STRATEGIES.register("task-arithmetic", TaskArithmeticOptions)
def task_arithmetic(
    model, options: TaskArithmeticOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Task arithmetic: independent τ_t from θ0, no regulariser; sum with validated λ, or average."""
    return TaskArithmetic(
        model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins
    )
