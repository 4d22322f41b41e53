"""MagMax (Marczak et al., ECCV 2024): sequential fine-tuning + maximum-magnitude merging of the task vectors.

Experience t starts from the previous experience's weights, θ_t ← θ_{t−1} (its task-vector module is a copy of
task t−1's: the same D, the same LoRA factors B, A, or the same IA3 scales), and is fine-tuned with
cross-entropy on its classes alone, no regulariser; its task vector is the cumulative τ_t = θ_t − θ0. The
evaluated model is θ0 + λ MagMax(τ_1..τ_T), per coordinate the entry of largest magnitude
(:func:`~.merging.magmax_merge`), λ chosen on held-out validation data of the training experiences
(``composition: magmax``, the default here; any other rule may be set instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.options import TaskVectorOptions


@dataclasses.dataclass
class MagMaxOptions(TaskVectorOptions):
    """MagMax: sequential fine-tuning from the previous task's weights; max-magnitude merge with validated λ."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"composition": "magmax"}}

    composition: Literal["average", "sum", "ties", "magmax", "fisher", "tangent"] = "magmax"
    merge_fisher: Literal["stored", "task"] = "task"  # no θ0 Fisher is stored without a regulariser
    head_reg_l2: float = 0.0


class MagMax(TaskVectorStrategy):
    """Sequential fine-tuning (τ_t starts at τ_{t−1}) + MagMax merging of the cumulative task vectors."""

    method = "magmax"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: MagMaxOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else MagMaxOptions()
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    def _prepare_experience(self) -> None:
        super()._prepare_experience()
        t = self.task
        if t > 0:  # θ_t starts at θ_{t−1}: copy the values into the parameters the optimiser already holds
            with torch.no_grad():
                for p, q in zip(self.pool.task_parameters(t), self.pool.task_parameters(t - 1)):
                    p.copy_(q)
            self.model.invalidate()


@STRATEGIES.register("magmax", MagMaxOptions)
def magmax(model, options: MagMaxOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """MagMax: sequential fine-tuning (each task from the previous one's weights) + max-magnitude merging."""
    return MagMax(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
