"""The network that the task-vector strategies train: θ0, a pool of task vectors, one head per experience."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from clcompose.strategies.core.heads import ExperienceHeads
from clcompose.strategies.task_vectors.composition import Composition, linearised_forward
from clcompose.strategies.task_vectors.pool import TaskVectorPool


class ComposableNet(nn.Module):
    """θ0 + task-vector pool + one head per experience.

    In training mode the backbone runs at ``θ0 + τ_T`` (``train_composition="individual"``, ITA/TA), at the
    composed ``θ0 + (1/T)(Σ_{s<T} sg[τ_s] + τ_T)`` (``"composed"``, IEL) or linearised, f(θ0) + J(θ0)·τ_T
    (``"tangent"``, TMC). In eval mode it runs as :attr:`composition` says (:mod:`.composition`; by default
    ``θ0 + Σ_t c_t τ_t`` with ``coefficients``, 1/T each), materialised once and cached until the next
    ``train()`` or :meth:`invalidate`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        style: str = "lora",
        rank: int = 4,
        layers="all",
        train_composition: Literal["individual", "composed", "tangent"] = "individual",
        qkv_rank_multiplier: int = 1,
    ):
        super().__init__()
        self.pool = TaskVectorPool(
            backbone, layers=layers, style=style, rank=rank, qkv_rank_multiplier=qkv_rank_multiplier
        )
        self.heads = ExperienceHeads(feature_dim, freeze_old=True)
        self.train_composition = train_composition
        self.coefficients: list[float] | None = None
        self._past_sum: dict[str, torch.Tensor] | None = None  # Σ_{s<T} ΔW_s, detached (IEL forward)
        self._eval_weights: dict[str, torch.Tensor] | None = None
        self._eval_direction: dict[str, torch.Tensor] | None = None  # composition=tangent: Σ c_t τ_t
        self.composition = Composition()

    @property
    def backbone(self) -> nn.Module:
        return self.pool.model

    def train(self, mode: bool = True):
        self._eval_weights = self._eval_direction = None
        return super().train(mode)

    def invalidate(self) -> None:
        self._past_sum = None
        self._eval_weights = self._eval_direction = None
        self.composition.clear()

    def past_sum(self) -> dict[str, torch.Tensor]:
        if self._past_sum is None:
            with torch.no_grad():
                self._past_sum = self.pool.delta_sum([1.0] * (self.pool.num_tasks - 1), detach=True)
        return self._past_sum

    def composed_coefficients(self) -> list[float]:
        return list(self.coefficients) if self.coefficients is not None else self.pool.uniform()

    def backbone_weights(self) -> dict[str, torch.Tensor]:
        t = self.pool.num_tasks
        if t == 0:
            return self.pool.base_weights()
        if self.training:
            current = self.pool.deltas(t - 1)
            base = self.pool.base_weights()
            if self.train_composition == "tangent":
                return base
            if self.train_composition == "individual":
                return {n: base[n] + current[n] for n in self.pool.names}
            past = self.past_sum()
            return {n: base[n] + (past[n] + current[n]) / t for n in self.pool.names}
        if self._eval_weights is None:
            self._eval_weights = self.composition.weights(self.pool, self.composed_coefficients())
        return self._eval_weights

    def linearised(self) -> bool:
        """Whether the current forward is the linearised network (TMC training, ``composition=tangent``)."""
        if self.pool.num_tasks == 0:
            return False
        return self.train_composition == "tangent" if self.training else self.composition.rule == "tangent"

    def tangent_direction(self) -> dict[str, torch.Tensor]:
        """δ of the linearised forward: τ_T in training (with its graph), Σ_t c_t τ_t in eval (cached)."""
        if self.training:
            return self.pool.deltas(self.pool.num_tasks - 1)
        if self._eval_direction is None:
            self._eval_direction = self.composition.direction(self.pool, self.composed_coefficients())
        return self._eval_direction

    def features(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if weights is None and self.linearised():
            return linearised_forward(self.pool, self.pool.base_weights(), self.tangent_direction(), x)
        return self.pool.forward_with(self.backbone_weights() if weights is None else weights, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x))

    def individual_features(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Features of task t's own model: θ0 + τ_t, or f(θ0) + J(θ0)·τ_t when the composition is linearised."""
        if self.composition.rule == "tangent":
            return linearised_forward(self.pool, self.pool.base_weights(), self.pool.deltas(t), x)
        return self.pool.forward_with(self.individual_weights(t), x)

    def individual_weights(self, t: int) -> dict[str, torch.Tensor]:
        """θ0 + τ_t (coefficient 1)."""
        base, delta = self.pool.base_weights(), self.pool.deltas(t)
        return {n: base[n] + delta[n] for n in self.pool.names}
