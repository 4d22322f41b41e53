"""Validated hyperparameters of ITA, IEL and task arithmetic (every field is a ``strategy.*`` option)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from clcompose.strategies.core.registry import Options


def layer_selection(spec: str) -> str | list[str]:
    """The ``layers`` option as :func:`~clcompose.strategies.task_vectors.pool.select_layers` takes it: a kind
    (``all``, ``linear``, ``conv``) or a list of the comma-separated fnmatch patterns."""
    return spec if spec in ("all", "linear", "conv") else [p.strip() for p in spec.split(",") if p.strip()]


@dataclasses.dataclass
class TaskVectorOptions(Options):
    """Hyperparameters shared by ITA, IEL and task arithmetic."""

    tuning: Literal["full", "lora", "ia3"] = "lora"
    rank: int = 4
    layers: str = "all"  # "all" | "linear" | "conv" | comma-separated fnmatch patterns of module names
    reg_step: Literal["decoupled", "coupled"] = "coupled"  # decoupled: the reference code's separate SGD step
    clip_grad: float = 100.0  # per-parameter norm clip of the decoupled regulariser step
    head_reg_fisher: float | None = None  # req_weight_cls; None → α (ITA) or β (IEL)
    head_reg_l2: float = 0.001  # simple_reg_weight_cls
    head_fisher_classes: Literal["past", "all"] | None = None  # None → ITA: past, IEL: all (original code)
    head_init: Literal["anchor", "random"] = "anchor"  # start the trained head from the pre-consolidated one
    align_trained_heads: bool = True  # after each experience, classifier-align the trained heads (SLCA-style)
    probe_epochs: int = 20  # the probe runs on cached θ0 features, so many epochs are cheap
    probe_lr: float = 0.01
    probe_batch_size: int = 32
    align_epochs: int = 10  # classifier alignment: align_epochs + align_epochs_per_task · t epochs
    align_epochs_per_task: int = 5
    align_lr: float = 0.01
    align_per_class: int = 256
    align_temperature: float = 0.1
    gaussian_components: int = 1
    fisher: Literal["exact", "topk", "sampled"] = "sampled"
    fisher_topk: int = 3
    fisher_mc_samples: int = 1
    fisher_max_examples: int | None = 64  # Fisher on at most this many examples of each experience (None: all)
    fisher_chunk: int = 32
    eps: float = 1e-5
    cosine_schedule: bool = True  # lr_e = lr·cos(99πe / (200(E−1))) per epoch, as in the reference code
    diagnostics: bool = True  # Jensen gap, Fisher spread, ‖τ‖, cosines after each training step
    diagnostics_examples: int = 100  # per seen test experience

    def check(self) -> None:
        self.require(self.rank >= 1, "rank", "must be >= 1")
        self.require(self.clip_grad > 0, "clip_grad", "must be > 0")
        self.require(self.head_reg_fisher is None or self.head_reg_fisher >= 0, "head_reg_fisher", "must be >= 0")
        self.require(self.head_reg_l2 >= 0, "head_reg_l2", "must be >= 0")
        for name in ("probe_epochs", "align_epochs", "align_epochs_per_task"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("probe_lr", "align_lr", "align_temperature", "eps"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        for name in (
            "align_per_class",
            "probe_batch_size",
            "gaussian_components",
            "fisher_topk",
            "fisher_mc_samples",
            "fisher_chunk",
            "diagnostics_examples",
        ):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(
            self.fisher_max_examples is None or self.fisher_max_examples >= 1, "fisher_max_examples", "must be >= 1"
        )
        self.require(bool(self.layers.strip()), "layers", "must name layers")


@dataclasses.dataclass
class ITAOptions(TaskVectorOptions):
    """ITA: α is the strength of the Fisher anchor of τ_t to θ0 (Eq. 11–12)."""

    alpha: float = 0.1

    def check(self) -> None:
        super().check()
        self.require(self.alpha >= 0, "alpha", "must be >= 0")


@dataclasses.dataclass
class IELOptions(TaskVectorOptions):
    """IEL: β scales both the θ0 anchor and the alignment with past task vectors (Eq. 18–19)."""

    beta: float = 0.1

    def check(self) -> None:
        super().check()
        self.require(self.beta >= 0, "beta", "must be >= 0")


@dataclasses.dataclass
class TaskArithmeticOptions(TaskVectorOptions):
    """Independent fine-tuning from θ0 per experience; composed by average or by a validated sum λ Σ τ_t."""

    composition: Literal["average", "sum"] = "sum"
    lambda_grid: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    val_fraction: float = 0.1
    head_reg_l2: float = 0.0

    def check(self) -> None:
        super().check()
        self.require(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        self.require(
            bool(self.lambda_grid) and all(v > 0 for v in self.lambda_grid), "lambda_grid", "must hold positive values"
        )
