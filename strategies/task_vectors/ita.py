"""ITA, Incremental Task Arithmetic (Porrello et al., ICLR 2025, Eqs. 11–12).

Each experience trains θ0 + τ_t alone: CE on the current classes (past logits masked) + (α/2) Σ F̂ τ_t², with
F̂ the diagonal true Fisher at θ0 of the *past* experiences (first experience: F̂ = ε, i.e. effectively
unregularised, as in the reference code). Evaluation composes θ0 + (1/T) Σ_s τ_s with concatenated heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors import regularizers as R
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.options import ITAOptions


class ITA(TaskVectorStrategy):
    """Incremental Task Arithmetic: τ_t from θ0 alone + (α/2) Σ F̂_{<t} τ_t²; evaluate θ0 + (1/T) Σ τ_s."""

    method = "ita"
    train_composition = "individual"
    default_head_fisher_classes = "past"  # the original research code's choice (the reference's HEAD swapped it)

    def __init__(
        self,
        *,
        model: nn.Module,
        options: ITAOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else ITAOptions()
        self.alpha = options.alpha
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    def strength(self) -> float:
        return self.alpha

    def regularizer_fisher(self) -> dict[str, torch.Tensor]:
        return self.fisher.past(self.task, self.pool.base_weights())

    def regularizer_quadratic(self) -> R.Quadratic:
        return R.ita_quadratic(self.alpha, self.regularizer_fisher())


@STRATEGIES.register("ita", ITAOptions)
def ita(model, options: ITAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Incremental Task Arithmetic: τ_t from θ0 alone + (α/2)ΣF̂τ_t²; evaluate θ0 + (1/T)Στ_s."""
    return ITA(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
