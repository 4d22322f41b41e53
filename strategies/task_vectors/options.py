"""Validated hyperparameters of ITA, IEL and task arithmetic (every field is a ``strategy.*`` option).

``preset: reference`` sets every option of :data:`REFERENCE` (the reference code's update rule and
pre-consolidation, mammoth's ``second_order``) that the user did not give explicitly: an option given by the
user, on the command line, in a YAML file or as a keyword, always wins over the preset. The expansion happens
when the options are built, so a run's recorded config holds the values that were used.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Literal

from clcompose.strategies.core.registry import Options, _coerce


def layer_selection(spec: str) -> str | list[str]:
    """The ``layers`` option as :func:`~clcompose.strategies.task_vectors.pool.select_layers` takes it: a kind
    (``all``, ``linear``, ``conv``) or a list of the comma-separated fnmatch patterns."""
    return spec if spec in ("all", "linear", "conv") else [p.strip() for p in spec.split(",") if p.strip()]


# what `preset: reference` sets (shared part; ITA/IEL/TA add their own below). Not the hyperparameters the
# reference's configs choose (α, β, lr, batch size, rank, layers): those stay the user's.
REFERENCE: dict[str, Any] = {
    "reg_step": "decoupled",  # a separate plain-SGD step, scaled by the cosine factor, before AdamW's
    "clip_grad": 100.0,
    "head_init": "random",  # the trained head starts from its own trunc-normal init
    "align_trained_heads": False,  # the heads used at inference stay as trained
    "anchor_source": "persistent",  # a pre-tuning classifier kept across experiences, past heads re-aligned
    "probe_epochs": 3,
    "probe_lr": 0.01,
    "probe_batch_size": 128,
    "probe_momentum": 0.0,
    "probe_drop_last": True,
    "align_epochs": 10,
    "align_epochs_per_task": 5,
    "align_lr": 0.01,
    "align_per_class": 256,
    "align_temperature": 0.1,
    "align_momentum": 0.0,
    "align_drop_last": True,
    "gaussian_components": 5,
    "gmm_fit": "reference",
    "gmm_iterations": 500,
    "fisher": "exact",
    "fisher_max_examples": None,  # every training example of the experience
    "eps": 1e-5,
    "cosine_schedule": True,
    "qkv_rank_multiplier": 3,  # LoRA rank 3r on a ViT's fused attn.qkv
}
# train.virtual_batch / train.virtual_batch_quirk, when left unset (None), under the preset
REFERENCE_TRAIN: dict[str, Any] = {"virtual_batch": 16, "virtual_batch_quirk": True}


@dataclasses.dataclass
class TaskVectorOptions(Options):
    """Hyperparameters shared by ITA, IEL and task arithmetic."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": REFERENCE}

    preset: Literal["none", "reference"] = "none"  # reference: the reference code's procedure (see REFERENCE)
    tuning: Literal["full", "lora", "ia3"] = "lora"
    rank: int = 4
    qkv_rank_multiplier: int = 1  # LoRA rank of a layer named *attn.qkv = this × rank (the reference: 3)
    layers: str = "all"  # "all" | "linear" | "conv" | comma-separated fnmatch patterns of module names
    # how the regulariser acts: proximal = the implicit step θ ← argmin R + ‖·−θ‖²/(2s), the reference's update to
    # first order and stable for any strength; decoupled = the reference code's explicit SGD step θ ← θ − s∇R
    # (diverges once s·strength·F > 2); coupled = a term of the loss (through the optimiser; the default until the
    # proximal step existed). examples/sweep-reg-steps.yaml measured proximal = coupled in accuracy, never diverging
    reg_step: Literal["decoupled", "proximal", "coupled"] = "proximal"
    clip_grad: float = 100.0  # per-parameter norm clip of the decoupled regulariser step
    prox_sweeps: int = 1  # LoRA's proximal step: sweeps of exact block minimisation (A, then B)
    head_reg_fisher: float | None = None  # req_weight_cls; None → α (ITA) or β (IEL)
    head_reg_l2: float = 0.001  # simple_reg_weight_cls
    head_fisher_classes: Literal["past", "all"] | None = None  # None → ITA: past, IEL: all (original code)
    head_init: Literal["anchor", "random"] = "anchor"  # start the trained head from the pre-consolidated one
    align_trained_heads: bool = True  # after each experience, classifier-align the trained heads (SLCA-style)
    anchor_source: Literal["trained", "persistent"] = "trained"  # the anchor's past heads: copies of the trained
    # heads, or a pre-tuning classifier kept across experiences (the reference)
    probe_epochs: int = 20  # the probe runs on cached θ0 features, so many epochs are cheap
    probe_lr: float = 0.01
    probe_batch_size: int = 32
    probe_momentum: float = 0.9
    probe_drop_last: bool = False
    align_epochs: int = 10  # classifier alignment: align_epochs + align_epochs_per_task · t epochs
    align_epochs_per_task: int = 5
    align_lr: float = 0.01
    align_per_class: int = 256
    align_temperature: float = 0.1
    align_momentum: float = 0.9
    align_drop_last: bool = False
    gaussian_components: int = 1
    gmm_fit: Literal["sklearn", "reference"] = "sklearn"  # how a mixture (components > 1) is fitted
    gmm_iterations: int = 500
    fisher: Literal["exact", "topk", "sampled"] = "sampled"
    fisher_topk: int = 3
    fisher_mc_samples: int = 1
    fisher_max_examples: int | None = 64  # Fisher on at most this many examples of each experience (None: all)
    fisher_chunk: int = 32
    # batched: per-example squared gradients from hooks, one batched backward per label (Linear/Conv2d
    # weights; other targets fall back to vmap); vmap: per-example torch.func gradients (the reference path)
    fisher_backend: Literal["batched", "vmap"] = "batched"
    eps: float = 1e-5
    cosine_schedule: bool = True  # lr_e = lr·cos(99πe / (200(E−1))) per epoch, as in the reference code
    diagnostics: bool = True  # Jensen gap, Fisher spread, ‖τ‖, cosines after each training step
    diagnostics_examples: int = 100  # per seen test experience
    # how the task vectors are composed at evaluation (strategies/task_vectors/composition.py): average (1/T)Σ τ_t;
    # sum λΣ τ_t; ties λ·TIES(τ; density); magmax λ·MagMax(τ); fisher Σ F_t τ_t / Σ F_t; tangent the linearised
    # network f(θ0) + J(θ0)·(1/T)Σ τ_t. λ and the TIES density are chosen on validation data held out of the
    # training experiences (val_fraction of each, only for the rules with a hyperparameter: sum, ties, magmax)
    composition: Literal["average", "sum", "ties", "magmax", "fisher", "tangent"] = "average"
    lambda_grid: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0])
    ties_density_grid: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.2, 0.3])  # TIES top-k
    val_fraction: float = 0.1
    # composition=fisher: stored = the per-experience θ0 Fisher the regulariser keeps (needs α/β > 0); task = the
    # Fisher of each task's own model θ0 + τ_t with its head over its classes, after its training (Matena & Raffel)
    merge_fisher: Literal["stored", "task"] = "stored"

    def __new__(cls, *args, **kwargs):
        # remember which options the caller gave, so that a preset fills in only the others
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        object.__setattr__(self, "_explicit", frozenset(names[: len(args)]) | frozenset(kwargs))
        return self

    def __post_init__(self) -> None:
        preset = _coerce(self.preset, Literal["none", "reference"], self._where("preset"))
        for name, value in self.preset_values(preset).items():
            if name not in getattr(self, "_explicit", ()):
                setattr(self, name, copy.deepcopy(value))
        super().__post_init__()

    @classmethod
    def preset_values(cls, preset: str) -> dict[str, Any]:
        """The options ``preset`` sets for this method (shared ones, then the method's own)."""
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            out.update(vars(klass).get("PRESETS", {}).get(preset, {}))
        return out

    def fisher_estimator(self) -> dict[str, Any]:
        """The Fisher estimator's settings as the Fisher sums take them (``mode``, ``k``, ``samples``, ``chunk``)."""
        return {
            "mode": self.fisher,
            "k": self.fisher_topk,
            "samples": self.fisher_mc_samples,
            "chunk": self.fisher_chunk,
        }

    def train_value(self, name: str, given: Any) -> Any:
        """A ``train.*`` setting the preset decides when the user left it unset (``given is None``)."""
        if given is not None:
            return given
        if self.preset == "reference":
            return REFERENCE_TRAIN[name]
        return {"virtual_batch": 1, "virtual_batch_quirk": False}[name]

    def check(self) -> None:
        self.require(self.rank >= 1, "rank", "must be >= 1")
        self.require(self.qkv_rank_multiplier >= 1, "qkv_rank_multiplier", "must be >= 1")
        self.require(self.clip_grad > 0, "clip_grad", "must be > 0")
        self.require(self.head_reg_fisher is None or self.head_reg_fisher >= 0, "head_reg_fisher", "must be >= 0")
        self.require(self.head_reg_l2 >= 0, "head_reg_l2", "must be >= 0")
        for name in ("probe_epochs", "align_epochs", "align_epochs_per_task"):
            self.require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("probe_lr", "align_lr", "align_temperature", "eps"):
            self.require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("probe_momentum", "align_momentum"):
            self.require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        for name in (
            "align_per_class",
            "probe_batch_size",
            "gaussian_components",
            "gmm_iterations",
            "fisher_topk",
            "fisher_mc_samples",
            "fisher_chunk",
            "diagnostics_examples",
            "prox_sweeps",
        ):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(
            self.fisher_max_examples is None or self.fisher_max_examples >= 1, "fisher_max_examples", "must be >= 1"
        )
        self.require(bool(self.layers.strip()), "layers", "must name layers")
        self.require(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        self.require(
            bool(self.lambda_grid) and all(v > 0 for v in self.lambda_grid), "lambda_grid", "must hold positive values"
        )
        self.require(
            bool(self.ties_density_grid) and all(0 < v <= 1 for v in self.ties_density_grid),
            "ties_density_grid",
            "must hold values in (0, 1]",
        )


@dataclasses.dataclass
class ITAOptions(TaskVectorOptions):
    """ITA: α is the strength of the Fisher anchor of τ_t to θ0 (Eq. 11–12)."""

    # the reference's current code: the head Fisher over the classes of experiences 0..t (current included)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"head_fisher_classes": "all"}}

    alpha: float = 0.1

    def check(self) -> None:
        super().check()
        self.require(self.alpha >= 0, "alpha", "must be >= 0")


@dataclasses.dataclass
class IELOptions(TaskVectorOptions):
    """IEL: β scales both the θ0 anchor and the alignment with past task vectors (Eq. 18–19)."""

    # the reference's current code: the head Fisher over the past classes only (ε floor at the first experience)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"head_fisher_classes": "past"}}

    beta: float = 0.1

    def check(self) -> None:
        super().check()
        self.require(self.beta >= 0, "beta", "must be >= 0")


@dataclasses.dataclass
class TaskArithmeticOptions(TaskVectorOptions):
    """Independent fine-tuning from θ0 per experience; composed by average or by a validated sum λ Σ τ_t."""

    # the reference code's ITA with α = 0 (independent τ_t, evaluated at θ0 + (1/T) Σ τ_t)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"composition": "average"}}

    composition: Literal["average", "sum", "ties", "magmax", "fisher", "tangent"] = "sum"
    merge_fisher: Literal["stored", "task"] = "task"  # no θ0 Fisher is stored without a regulariser
    head_reg_l2: float = 0.0
