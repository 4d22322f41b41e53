"""IEL, Incremental Ensemble Learning (Porrello et al., ICLR 2025, Eqs. 18–19).

Each experience trains through the composed model θ0 + (1/T)(Σ_{s<T} sg[τ_s] + τ_T) with
(β/2) Σ_s ‖τ_s − τ̄‖²_F̄, F̄ the cumulative θ0 Fisher including the current experience; the closed-form gradient
β F̄[(1 − 1/T) τ_T − (1/T) Σ_{s<T} τ_s] uses the cached past sum, so its cost does not grow with T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors import regularizers as R
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.options import IELOptions


class IEL(TaskVectorStrategy):
    """Incremental Ensemble Learning: train the composed model + (β/2) Σ_s ‖τ_s − τ̄‖²_F̄."""

    method = "iel"
    train_composition = "composed"
    default_head_fisher_classes = "all"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: IELOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else IELOptions()
        self.beta = options.beta
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    def strength(self) -> float:
        return self.beta

    def regularizer_fisher(self) -> dict[str, torch.Tensor]:
        return self.fisher.upto(self.task)

    def regularizer_quadratic(self) -> R.Quadratic:
        past = self.model.past_sum() if self.task > 0 else None
        return R.iel_quadratic(self.beta, self.regularizer_fisher(), past, self.task + 1)


@STRATEGIES.register("iel", IELOptions)
def iel(model, options: IELOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Incremental Ensemble Learning: train the composed model + (β/2)Σ_s‖τ_s − τ̄‖²_F̄."""
    return IEL(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
