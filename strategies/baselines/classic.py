"""Baseline strategies: naive fine-tuning (lower bound), joint training (upper bound), EWC and LwF.

They are Avalanche's own strategies, configured through the suite's validated options so that every
strategy is built the same way: ``STRATEGIES[name].factory(model, options, train_config, ...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

from avalanche.training import EWC, JointTraining, LwF, Naive
from avalanche.training.templates import SupervisedTemplate

from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig, template_kwargs


@dataclasses.dataclass
class NoOptions(Options):
    """This strategy has no hyperparameters of its own."""


@STRATEGIES.register("naive", NoOptions)
def naive(
    model, options: NoOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> SupervisedTemplate:
    """Naive fine-tuning of the whole network on each experience in turn (lower bound)."""
    return Naive(**template_kwargs(model, train, evaluator, device, plugins))


@STRATEGIES.register("joint", NoOptions)
def joint(
    model, options: NoOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> SupervisedTemplate:
    """Joint training on the union of all experiences (upper bound); trains once on the whole stream."""
    return JointTraining(**template_kwargs(model, train, evaluator, device, plugins))


@dataclasses.dataclass
class EWCOptions(Options):
    """Elastic weight consolidation (Kirkpatrick et al. 2017): λ Σ F (θ − θ*)² with Avalanche's Fisher."""

    ewc_lambda: float = 100.0
    mode: Literal["separate", "online"] = "separate"
    decay_factor: float = 0.9

    def check(self) -> None:
        self.require(self.ewc_lambda >= 0, "ewc_lambda", "must be >= 0")
        self.require(0 < self.decay_factor <= 1, "decay_factor", "must be in (0, 1]")


@STRATEGIES.register("ewc", EWCOptions)
def ewc(
    model, options: EWCOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> SupervisedTemplate:
    """EWC anchored at the previous experiences' solutions (Avalanche's plugin), full fine-tuning."""
    return EWC(
        ewc_lambda=options.ewc_lambda,
        mode=options.mode,
        decay_factor=options.decay_factor if options.mode == "online" else None,
        **template_kwargs(model, train, evaluator, device, plugins),
    )


@dataclasses.dataclass
class LwFOptions(Options):
    """Learning without Forgetting (Li & Hoiem 2017): distillation of old-class outputs on new data."""

    alpha: float = 1.0
    temperature: float = 2.0

    def check(self) -> None:
        self.require(self.alpha >= 0, "alpha", "must be >= 0")
        self.require(self.temperature > 0, "temperature", "must be > 0")


@STRATEGIES.register("lwf", LwFOptions)
def lwf(
    model, options: LwFOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> SupervisedTemplate:
    """LwF with Avalanche's distillation plugin."""
    return LwF(
        alpha=options.alpha,
        temperature=options.temperature,
        **template_kwargs(model, train, evaluator, device, plugins),
    )
