"""Validated options of the template strategies (every field is a ``strategy.*`` option)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from clcompose.strategies.core.registry import Options
from clcompose.strategies.task_vectors.options import IELOptions, ITAOptions

ProgramInit = Literal["uniform", "copy", "mean"]


@dataclasses.dataclass
class ProgramOptions(Options):
    """Options shared by every template strategy."""

    program_init: ProgramInit = "uniform"
    program_lr_scale: float = 10.0  # learning rate of ξ = scale × train.lr (programs are L·N numbers)
    similarity_examples: int = 256  # examples of the new task used to pick the most similar program (copy)
    ladder: bool = True  # transfer ladder on the benchmark's held-out domain after the stream
    ladder_epochs: int | None = None  # None: train.epochs
    recalibrate: bool = True  # after training a task, its statistics = exact averages over its training data

    def check(self) -> None:
        self.require(self.program_lr_scale > 0, "program_lr_scale", "must be > 0")
        self.require(self.similarity_examples >= 2, "similarity_examples", "must be >= 2")
        self.require(self.ladder_epochs is None or self.ladder_epochs >= 1, "ladder_epochs", "must be >= 1")


@dataclasses.dataclass
class TemplateEWCOptions(ProgramOptions):
    """EWC on the shared parameters: (λ/2) Σ_s F_s (θ − θ*_s)² (one anchor and Fisher per past experience)."""

    ewc_lambda: float = 100.0
    # bank (the paper's row): after the first experience only the templates (+ ξ_t, head_t) train, with the
    # penalty on them, stem and adapter frozen; shared: stem, templates and adapter all train, all penalised
    scope: Literal["bank", "shared"] = "bank"
    # proximal: after each optimiser step, θ ← argmin (1/2η)‖θ − θ'‖² + penalty (stable for any λ);
    # gradient: the penalty's gradient in the loss, which diverges once η·λ·F exceeds the optimiser's stability
    # limit (on the domains stream max F ≈ 25, so λ = 100 at η = 0.05 went to NaN)
    step: Literal["proximal", "gradient"] = "proximal"
    fisher: Literal["exact", "topk", "sampled"] = "exact"
    fisher_max_examples: int = 128

    def check(self) -> None:
        super().check()
        self.require(self.ewc_lambda >= 0, "ewc_lambda", "must be >= 0")
        self.require(self.fisher_max_examples >= 1, "fisher_max_examples", "must be >= 1")


@dataclasses.dataclass
class _TemplateVectorFields:
    """The :class:`ProgramOptions` fields with the defaults that suit task vectors on ξ.

    A mixin placed after ITA's/IEL's options, so these fields come first in the option list (dataclass order).
    """

    program_init: ProgramInit = "uniform"  # uniform: τ = 0 (the base program); copy / mean of earlier τ (full tuning)
    # learning rate of ξ0 (first experience) and of τ_t = scale × train.lr; 1, not the others' 10: with the
    # statistics frozen at θ0, large program moves change activations the statistics no longer match, and at
    # 10× the logits of τ_t diverged (one-hot mixtures, chance accuracy) on the domains stream
    program_lr_scale: float = 1.0
    similarity_examples: int = 256
    ladder: bool = True
    ladder_epochs: int | None = None
    recalibrate: bool = True  # statistics of θ0 = exact averages over the first experience's training data


def _check_vector_options(opts) -> None:
    opts.require(opts.layers == "xi", "layers", "must be 'xi' (task vectors live on the program's mixture logits)")
    opts.require(opts.program_init == "uniform" or opts.tuning == "full", "program_init", "copy/mean needs tuning=full")
    opts.require(opts.program_lr_scale > 0, "program_lr_scale", "must be > 0")
    opts.require(opts.similarity_examples >= 2, "similarity_examples", "must be >= 2")


@dataclasses.dataclass
class TemplateITAOptions(ITAOptions, _TemplateVectorFields):
    """ITA with task vectors τ_t on the program ξ (L × N logits); dense τ by default."""

    tuning: Literal["full", "lora", "ia3"] = "full"
    layers: str = "xi"

    def check(self) -> None:
        super().check()
        _check_vector_options(self)


@dataclasses.dataclass
class TemplateIELOptions(IELOptions, _TemplateVectorFields):
    """IEL with task vectors τ_t on the program ξ (L × N logits); dense τ by default."""

    tuning: Literal["full", "lora", "ia3"] = "full"
    layers: str = "xi"

    def check(self) -> None:
        super().check()
        _check_vector_options(self)
