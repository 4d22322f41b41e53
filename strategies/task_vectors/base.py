"""The training procedure that ITA, IEL and task arithmetic share (:class:`TaskVectorStrategy`).

All three train one task vector τ_t per experience from the frozen pre-trained θ0 and evaluate the composed
model θ0 + Σ_t c_t τ_t (c_t = 1/T by default) with one head per experience, concatenated in label space. The
subclasses say only what differs: the training forward (θ0 + τ_T alone, or through the composition), the Fisher
of the regulariser and its closed-form gradient (:mod:`.ita`, :mod:`.iel`, :mod:`.task_arithmetic`).

Shared here: task pre-consolidation (linear probe + classifier alignment on frozen θ0 features → anchor heads,
from copies of the trained heads or from a pre-tuning classifier kept across experiences), the θ0 Fisher, the
head regulariser toward the anchor, gradient accumulation (:class:`~clcompose.strategies.core.training.VirtualBatchEpoch`)
and the second-order diagnostics. How the regulariser acts on a step (coupled, decoupled, proximal) is
:mod:`.steps`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from clcompose.strategies.core.fisher import FisherAccumulator, fisher_sum
from clcompose.strategies.core.heads import ExperienceHeads, mask_to_classes
from clcompose.strategies.core.per_example import layer_fisher_sum, supported
from clcompose.strategies.core.training import TrainConfig, VirtualBatchEpoch, make_optimizer, template_kwargs
from clcompose.strategies.task_vectors import regularizers as R
from clcompose.strategies.task_vectors.composable import ComposableNet
from clcompose.strategies.task_vectors.composition import Composition, composition_plugins
from clcompose.strategies.task_vectors.consolidation import (
    ClassGaussians,
    align_classifier,
    anchor_heads,
    has_train_augmentation,
)
from clcompose.strategies.task_vectors.diagnostics import DiagnosticsCache, second_order_diagnostics
from clcompose.strategies.task_vectors.options import TaskVectorOptions, layer_selection
from clcompose.strategies.task_vectors.pool import TaskVectorPool
from clcompose.strategies.task_vectors.skills import save_task_vectors
from clcompose.strategies.task_vectors.steps import RegularizerSteps
from clcompose.strategies.task_vectors.theta0 import retained_fisher_modules, theta0_fisher, theta0_pass


class TaskVectorStrategy(VirtualBatchEpoch, RegularizerSteps, SupervisedTemplate):
    """The shared training procedure of ITA, IEL and task arithmetic (see the module docstring).

    Subclasses set :attr:`method` (recorded), :attr:`train_composition` and :attr:`default_head_fisher_classes`,
    and override :meth:`strength`, :meth:`regularizer_fisher` and :meth:`regularizer_quadratic`.
    """

    method: ClassVar[str] = ""
    train_composition: ClassVar[Literal["individual", "composed", "tangent"]] = "individual"
    default_head_fisher_classes: ClassVar[Literal["past", "all"]] = "all"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: TaskVectorOptions,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        train = train if train is not None else TrainConfig()
        if not isinstance(model, ComposableNet):
            backbone = getattr(model, "backbone", model)
            dim = model.heads.in_features if hasattr(model, "heads") else backbone.out_features
            model = ComposableNet(
                backbone,
                dim,
                options.tuning,
                options.rank,
                layer_selection(options.layers),
                self.train_composition,
                qkv_rank_multiplier=options.qkv_rank_multiplier,
            )
        self.options, self.train_config = options, train
        # train.virtual_batch / _quirk left unset (None) follow the preset (16 and the quirk under `reference`)
        self.virtual_batch = options.train_value("virtual_batch", train.virtual_batch)
        self.virtual_batch_quirk = options.train_value("virtual_batch_quirk", train.virtual_batch_quirk)
        self.head_reg_fisher = options.head_reg_fisher if options.head_reg_fisher is not None else self.strength()
        self.head_fisher_classes = options.head_fisher_classes or self.default_head_fisher_classes
        self.fisher = FisherAccumulator(options.eps)
        self.stats = ClassGaussians(options.gaussian_components, fit=options.gmm_fit, iterations=options.gmm_iterations)
        self.anchor: ExperienceHeads | None = None
        self.pretuning: ExperienceHeads | None = None  # anchor_source=persistent: the pre-tuning classifier
        self.head_fisher: dict[str, torch.Tensor] | None = None
        self.stability: list[dict] = []  # per experience: stability numbers of the explicit step
        self.step_counts: list[int] = []  # optimiser steps per experience
        self.warnings: list[str] = []
        self.warned: set[str] = set()
        self.diagnostics: list[dict] = []
        self.diagnostics_cache = DiagnosticsCache()  # features of frozen task models; the diagnostics' seconds
        model.composition = Composition(options.composition, density=options.ties_density_grid[0])
        self.composition_plugins = composition_plugins(options, self.strength())  # λ selection, merge Fishers
        plugins = [*plugins, *self.composition_plugins]
        self.prep_times: list[dict] = []
        self._diag_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)  # replaced per experience
        super().__init__(
            **template_kwargs(model, train, evaluator, device, plugins, optimizer=placeholder, accumulates=True)
        )
        self.scheduler = None

    # ------------------------------------------------------------------ what the methods define
    def strength(self) -> float:
        """The regulariser's coefficient (ITA's α, IEL's β; 0: no backbone regulariser and no θ0 Fisher)."""
        return 0.0

    def regularizer_fisher(self) -> dict[str, torch.Tensor]:
        """The diagonal Fisher the backbone regulariser of the current experience uses."""
        raise NotImplementedError

    def regularizer_quadratic(self) -> R.Quadratic:
        """(a, b) of the backbone regulariser R(ΔW_T) = ½ Σ a ΔW_T² − Σ b ΔW_T of the current experience."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    @property
    def pool(self) -> TaskVectorPool:
        return self.model.pool

    def task_vector_count(self) -> int:
        """How many task vectors the pool holds (one per trained experience)."""
        return self.pool.num_tasks

    def features_at(self, coefficients: Sequence[float] | None):
        """The backbone's features at θ0 + Σ_t c_t τ_t (``None``: θ0), as a function of the inputs."""
        pool = self.pool
        weights = pool.base_weights() if coefficients is None else pool.weights(coefficients)
        return lambda x: pool.forward_with(weights, x)

    @property
    def task(self) -> int:
        return self.pool.num_tasks - 1

    def _needs_fisher(self) -> bool:
        return self.strength() > 0

    def _needs_anchor(self) -> bool:
        return self._needs_fisher() or self.head_reg_fisher > 0 or self.options.head_reg_l2 > 0

    def _rng(self) -> torch.Generator:
        # a private stream drawn from the global one, so pre-consolidation stays reproducible per seed
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def loader(self, dataset, shuffle: bool = False) -> DataLoader:
        """Evaluation-sized batches of ``dataset`` (θ0 features, validation)."""
        return DataLoader(
            dataset,
            batch_size=self.train_config.eval_batch_size,
            shuffle=shuffle,
            collate_fn=getattr(dataset, "collate_fn", None),
        )

    def _base_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ0 features, labels and inputs of a dataset (no task vector applied)."""
        return theta0_pass(self, dataset)[:3]

    # ------------------------------------------------------------------ experience set-up
    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        self.model = self.model_adaptation()  # adds the new head
        self._prepare_experience()

    def make_optimizer(self, **kwargs):
        """The optimiser is rebuilt per experience in :meth:`_prepare_experience` (current τ_t and head only)."""

    def _prepare_experience(self) -> None:
        opts = self.options
        t0 = time.perf_counter()
        t = self.pool.add_task()
        self.pool.vectors[t].to(self.device)
        self.model.invalidate()
        if t != len(self.model.heads.heads) - 1:
            raise RuntimeError("each experience must bring new classes (one head and one task vector per experience)")
        gen = self._rng()
        timing = {"experience": t}
        if self._needs_anchor():
            retain = retained_fisher_modules(self, len(self.adapted_dataset))  # the Fisher reuses the θ0 pass
            feats, labels, inputs, retained = theta0_pass(self, self.adapted_dataset, retain)
            timing["theta0_s"] = time.perf_counter() - t0
            self.stats.fit(feats.cpu(), labels.cpu(), seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.anchor = self._consolidate(feats, labels, gen)
            timing["consolidation_s"] = time.perf_counter() - t0
            if self._needs_fisher():
                t1 = time.perf_counter()
                if opts.fisher_max_examples is not None and len(inputs) > opts.fisher_max_examples:
                    inputs = inputs[torch.randperm(len(inputs), generator=gen)[: opts.fisher_max_examples]]
                sums, count = (
                    theta0_fisher(self, retained, gen) if retained is not None else self.backbone_fisher(inputs, gen)
                )
                self.fisher.add(sums, count)
                timing["fisher_s"] = time.perf_counter() - t1
            self.head_fisher = self.classifier_fisher(gen) if self.head_reg_fisher > 0 else None
            if opts.head_init == "anchor":
                self.model.heads.heads[t].load_state_dict(self.anchor.heads[t].state_dict())
        params = self.pool.task_parameters(t) + list(self.model.heads.heads[t].parameters())
        self.optimizer = make_optimizer(params, self.train_config)
        self.scheduler = None
        if opts.cosine_schedule and self.train_epochs > 1:
            epochs = self.train_epochs
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda e: math.cos(99 * math.pi * e / (200 * (epochs - 1)))
            )
        self._quad = self.regularizer_quadratic() if self._needs_fisher() else None
        self.optimizer_steps = 0
        self.regularizer_step_s = 0.0  # seconds of the decoupled/proximal regulariser steps of this experience
        self._record_stability(t)
        timing["prepare_s"] = time.perf_counter() - t0
        self.prep_times.append(timing)

    def _consolidate(self, feats: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> ExperienceHeads:
        """The anchor heads of the current experience: the new head probed on θ0 features, then all heads
        classifier-aligned on the class statistics. ``anchor_source=trained`` starts from copies of the trained
        heads; ``persistent`` (the reference) from the pre-tuning classifier of the earlier experiences, whose
        new head starts from the trained head's init at the first experience (the reference deep-copies the
        classifier before training) and from its own trunc-normal draw later, and which keeps the result."""
        opts, t = self.options, self.task
        source = self.model.heads
        if opts.anchor_source == "persistent":
            if self.pretuning is None:
                self.pretuning = ExperienceHeads(self.model.heads.in_features)
            head = self.pretuning.add_head(self.model.heads.head_classes[t], generator=gen).to(self.device)
            if t == 0:
                head.load_state_dict(self.model.heads.heads[0].state_dict())
            source = self.pretuning
        data = self.adapted_dataset
        augmented = has_train_augmentation(data)  # then θ0 features are recomputed every probing epoch
        anchor = anchor_heads(
            source,
            self.stats,
            feats,
            labels,
            probe=dict(
                epochs=opts.probe_epochs,
                lr=opts.probe_lr,
                batch_size=opts.probe_batch_size,
                momentum=opts.probe_momentum,
                drop_last=opts.probe_drop_last,
            ),
            align=self._align_settings(t),
            generator=gen,
            features_fn=(lambda: self._base_features(data)[:2]) if augmented else None,
        )
        if opts.anchor_source == "persistent":
            self.pretuning = anchor
        return anchor

    def _align_settings(self, t: int) -> dict:
        opts = self.options
        return dict(
            epochs=opts.align_epochs + opts.align_epochs_per_task * t,
            lr=opts.align_lr,
            per_class=opts.align_per_class,
            temperature=opts.align_temperature,
            batch_size=128,
            momentum=opts.align_momentum,
            drop_last=opts.align_drop_last,
        )

    def backbone_fisher(self, inputs: torch.Tensor, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
        """Diagonal true Fisher of the targeted weights at θ0, softmax over all seen classes of the anchor heads."""
        anchor, seen = self.anchor, torch.tensor(self.anchor.seen_classes, device=self.device)
        pool = self.pool

        def log_prob(weights, x):
            logits = anchor(pool.forward_with(weights, x.unsqueeze(0)))[0, seen]
            return F.log_softmax(logits, dim=-1)

        opts = self.options
        batches = torch.split(inputs, self.train_config.eval_batch_size)
        modules = self._fisher_modules() if opts.fisher_backend == "batched" else None
        if modules is not None:
            backbone = pool.model
            was_training = backbone.training
            backbone.eval()  # examples must not interact (BatchNorm on running statistics)
            try:
                return layer_fisher_sum(
                    lambda x: F.log_softmax(anchor(backbone(x))[:, seen], dim=-1),
                    modules,
                    batches,
                    **opts.fisher_estimator(),
                    generator=gen,
                    root=backbone,
                )
            finally:
                backbone.train(was_training)
        return fisher_sum(
            log_prob,
            pool.base_weights(),
            batches,
            **opts.fisher_estimator(),
            generator=gen,
        )

    def _fisher_modules(self) -> dict[str, nn.Module] | None:
        """The Linear/Conv2d modules whose weights the pool targets, when the batched Fisher covers them all."""
        modules = {}
        for name in self.pool.names:
            owner, _, leaf = name.rpartition(".")
            module = self.pool.model.get_submodule(owner) if leaf == "weight" else None
            if module is None or not supported(module):
                return None
            modules[name] = module
        return modules

    def classifier_fisher(self, gen: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Fisher of the current head's weight and bias through the anchor heads, on synthetic features."""
        t, anchor = self.task, self.anchor
        current = set(anchor.head_classes[t])
        classes = [c for c in anchor.seen_classes if self.head_fisher_classes == "all" or c not in current]
        if not classes:
            return None  # ITA's first experience: no past class, only the ε floor applies
        x, _ = self.stats.sample(classes, self.options.align_per_class, gen)
        seen = torch.tensor(anchor.seen_classes)
        params = {f"heads.{t}.weight": anchor.heads[t].weight, f"heads.{t}.bias": anchor.heads[t].bias}

        def log_prob(p, f):
            return F.log_softmax(functional_call(anchor, p, (f.unsqueeze(0),))[0, seen], dim=-1)

        sums, count = fisher_sum(log_prob, params, [x.to(self.device)], mode="exact", chunk=256)
        return {"weight": sums[f"heads.{t}.weight"] / count, "bias": sums[f"heads.{t}.bias"] / count}

    # ------------------------------------------------------------------ training
    def criterion(self):
        classes = self.model.heads.head_classes[self.task] if self.is_training else None
        if classes is None:
            return F.cross_entropy(self.mb_output, self.mb_y)
        loss = F.cross_entropy(mask_to_classes(self.mb_output, classes), self.mb_y)
        if self.options.reg_step == "coupled":
            reg = self.backbone_reg_grads()
            if reg is not None:
                loss = loss + R.surrogate(*reg)
            head = self.head_penalty()
            if head is not None:
                loss = loss + head
        return loss

    def _after_training_epoch(self, **kwargs):
        super()._after_training_epoch(**kwargs)
        if self.scheduler is not None:
            self.scheduler.step()

    def _after_training_exp(self, **kwargs):
        t = self.task
        self.step_counts.append(self.optimizer_steps)
        if self.optimizer_steps == 0 and self.train_epochs > 0:
            self.warn_once(
                "no-step",
                f"experience {t} took no optimiser step: each epoch had too few mini-batches for one virtual batch "
                f"of {self.virtual_batch}{' + 1 (the reference first-step quirk)' if self.virtual_batch_quirk else ''}",
            )
        self.pool.freeze(t)
        for p in self.model.heads.heads[t].parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        if self.options.align_trained_heads and self.stats.params:
            self._align_trained_heads()
        timing = self.prep_times[-1] if self.prep_times and self.prep_times[-1]["experience"] == t else {}
        timing["align_trained_s"] = time.perf_counter() - t0
        if self.options.reg_step != "coupled":  # coupled: the regulariser is in the loss, not timed apart
            timing["regularizer_step_s"] = self.regularizer_step_s
        self.model.invalidate()
        super()._after_training_exp(**kwargs)

    def _align_trained_heads(self) -> None:
        """Classifier alignment of the heads used at inference on the θ0 feature statistics of all seen classes
        (rehearsal-free: only the per-class Gaussians are kept); the heads stay frozen afterwards."""
        heads = self.model.heads
        for p in heads.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            align_classifier(heads, self.stats, generator=self._rng(), **self._align_settings(self.task))
        for p in heads.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ second-order diagnostics (eval-time)
    def _before_eval(self, **kwargs):
        self._diag_batches = []
        super()._before_eval(**kwargs)

    def _after_eval_iteration(self, **kwargs):
        super()._after_eval_iteration(**kwargs)
        if not self.options.diagnostics or self.pool.num_tasks == 0:
            return
        seen = set(self.model.heads.seen_classes)
        keep = torch.tensor([int(y) in seen for y in self.mb_y], dtype=torch.bool)
        have = sum(len(y) for _, y, e in self._diag_batches if e == self.experience.current_experience)
        room = self.options.diagnostics_examples - have
        if keep.any() and room > 0:
            idx = torch.nonzero(keep).flatten()[:room]
            self._diag_batches.append(
                (self.mb_x[idx].detach(), self.mb_y[idx].detach(), self.experience.current_experience)
            )

    def _after_eval(self, **kwargs):
        if self.options.diagnostics and self._diag_batches and self.pool.num_tasks > 0:
            row = second_order_diagnostics(self.model, self._diag_batches, self.fisher, self.diagnostics_cache)
            row["tasks"] = self.pool.num_tasks
            self.diagnostics = [d for d in self.diagnostics if d["tasks"] != row["tasks"]] + [row]
        self._diag_batches = []
        super()._after_eval(**kwargs)

    # ------------------------------------------------------------------ run-record hooks
    def record_extras(self) -> dict:
        return {
            "method": self.method,
            "trainable_parameters_per_task": self.pool.trainable_count(0) if self.pool.num_tasks else 0,
            "tuned_weights": len(self.pool.names),
            "preparation": [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()} for d in self.prep_times
            ],
            "lambda": next((p.rows or None for p in self.composition_plugins if hasattr(p, "rows")), None),
            "virtual_batch": self.virtual_batch,
            "virtual_batch_quirk": self.virtual_batch_quirk,
            "optimizer_steps": self.step_counts,
            "stability": self.stability,
            "warnings": self.warnings,
            "diagnostics": self.diagnostics,
            "diagnostics_seconds": self.diagnostics_cache.seconds,  # measured apart from training
        }

    def save_artifacts(self, folder: Path) -> list[str]:
        path = save_task_vectors(self.model, Path(folder) / "task_vectors.safetensors", method=self.method)
        return [path.name]
