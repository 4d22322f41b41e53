"""The training procedure that ITA, IEL and task arithmetic share (:class:`TaskVectorStrategy`).

All three train one task vector τ_t per experience from the frozen pre-trained θ0 and evaluate the composed
model θ0 + Σ_t c_t τ_t (c_t = 1/T by default) with one head per experience, concatenated in label space. The
subclasses say only what differs: the training forward (θ0 + τ_T alone, or through the composition), the Fisher
of the regulariser and its closed-form gradient (:mod:`.ita`, :mod:`.iel`, :mod:`.task_arithmetic`).

Shared here: task pre-consolidation (linear probe + classifier alignment on frozen θ0 features → anchor heads),
the θ0 Fisher, the head regulariser toward the anchor, the regulariser applied either as a *decoupled* plain
SGD step scaled by the learning-rate schedule (separate from the optimiser; the reference code's update) or as
a *coupled* loss term, and the second-order diagnostics.
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
from clcompose.strategies.core.training import TrainConfig, make_optimizer, template_kwargs
from clcompose.strategies.task_vectors import regularizers as R
from clcompose.strategies.task_vectors.composable import ComposableNet
from clcompose.strategies.task_vectors.consolidation import ClassGaussians, align_classifier, anchor_heads
from clcompose.strategies.task_vectors.diagnostics import second_order_diagnostics
from clcompose.strategies.task_vectors.options import TaskVectorOptions, layer_selection
from clcompose.strategies.task_vectors.pool import TaskVectorPool
from clcompose.strategies.task_vectors.skills import save_task_vectors


class TaskVectorStrategy(SupervisedTemplate):
    """The shared training procedure of ITA, IEL and task arithmetic (see the module docstring).

    Subclasses set :attr:`method` (recorded), :attr:`train_composition` and :attr:`default_head_fisher_classes`,
    and override :meth:`strength`, :meth:`regularizer_fisher` and :meth:`regularizer_grads`.
    """

    method: ClassVar[str] = ""
    train_composition: ClassVar[Literal["individual", "composed"]] = "individual"
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
                backbone, dim, options.tuning, options.rank, layer_selection(options.layers), self.train_composition
            )
        self.options, self.train_config = options, train
        self.head_reg_fisher = options.head_reg_fisher if options.head_reg_fisher is not None else self.strength()
        self.head_fisher_classes = options.head_fisher_classes or self.default_head_fisher_classes
        self.fisher = FisherAccumulator(options.eps)
        self.stats = ClassGaussians(options.gaussian_components)
        self.anchor: ExperienceHeads | None = None
        self.head_fisher: dict[str, torch.Tensor] | None = None
        self.diagnostics: list[dict] = []
        self.prep_times: list[dict] = []
        self._diag_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)  # replaced per experience
        super().__init__(**template_kwargs(model, train, evaluator, device, plugins, optimizer=placeholder))
        self.scheduler = None

    # ------------------------------------------------------------------ what the methods define
    def strength(self) -> float:
        """The regulariser's coefficient (ITA's α, IEL's β; 0: no backbone regulariser and no θ0 Fisher)."""
        return 0.0

    def regularizer_fisher(self) -> dict[str, torch.Tensor]:
        """The diagonal Fisher the backbone regulariser of the current experience uses."""
        raise NotImplementedError

    def regularizer_grads(self, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Closed-form ∂R/∂ΔW_T of the backbone regulariser at the current deltas."""
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

    @torch.no_grad()
    def _base_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ0 features, labels and inputs of a dataset (no task vector applied)."""
        feats, labels, inputs = [], [], []
        base = self.pool.base_weights()
        was_training = self.model.training
        self.model.eval()
        for batch in self.loader(dataset):
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            feats.append(self.pool.forward_with(base, x))
            labels.append(y)
            inputs.append(x)
        self.model.train(was_training)
        return torch.cat(feats), torch.cat(labels), torch.cat(inputs)

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
            feats, labels, inputs = self._base_features(self.adapted_dataset)
            self.stats.fit(feats.cpu(), labels.cpu(), seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            self.anchor = anchor_heads(
                self.model.heads,
                self.stats,
                feats,
                labels,
                probe_epochs=opts.probe_epochs,
                probe_lr=opts.probe_lr,
                probe_batch_size=opts.probe_batch_size,
                align_epochs=opts.align_epochs + opts.align_epochs_per_task * t,
                align_lr=opts.align_lr,
                align_per_class=opts.align_per_class,
                align_temperature=opts.align_temperature,
                batch_size=128,
                generator=gen,
            )
            timing["consolidation_s"] = time.perf_counter() - t0
            if self._needs_fisher():
                t1 = time.perf_counter()
                if opts.fisher_max_examples is not None and len(inputs) > opts.fisher_max_examples:
                    inputs = inputs[torch.randperm(len(inputs), generator=gen)[: opts.fisher_max_examples]]
                sums, count = self.backbone_fisher(inputs, gen)
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
        self._fisher_now = self.regularizer_fisher() if self._needs_fisher() else None
        timing["prepare_s"] = time.perf_counter() - t0
        self.prep_times.append(timing)

    def backbone_fisher(self, inputs: torch.Tensor, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
        """Diagonal true Fisher of the targeted weights at θ0, softmax over all seen classes of the anchor heads."""
        anchor, seen = self.anchor, torch.tensor(self.anchor.seen_classes, device=self.device)
        pool = self.pool

        def log_prob(weights, x):
            logits = anchor(pool.forward_with(weights, x.unsqueeze(0)))[0, seen]
            return F.log_softmax(logits, dim=-1)

        opts = self.options
        batches = torch.split(inputs, self.train_config.eval_batch_size)
        return fisher_sum(
            log_prob,
            pool.base_weights(),
            batches,
            mode=opts.fisher,
            k=opts.fisher_topk,
            samples=opts.fisher_mc_samples,
            chunk=opts.fisher_chunk,
            generator=gen,
        )

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

    # ------------------------------------------------------------------ regularisers
    def backbone_reg_grads(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(ΔW_T with graph, closed-form ∂R/∂ΔW_T) or None when the backbone is unregularised."""
        if self._fisher_now is None:
            return None
        current = self.pool.deltas(self.task)
        return current, self.regularizer_grads(current)

    def head_penalty(self) -> torch.Tensor | None:
        """req · Σ (F_cls + ε)(W − W_pre)² + l2 · ‖W − W_pre‖² over the current head's weight and bias."""
        if self.anchor is None or (self.head_reg_fisher == 0 and self.options.head_reg_l2 == 0):
            return None
        head, pre = self.model.heads.heads[self.task], self.anchor.heads[self.task]
        total = 0.0
        for name in ("weight", "bias"):
            diff2 = (getattr(head, name) - getattr(pre, name)).pow(2)
            if self.head_reg_fisher > 0 and self.head_fisher is not None:
                total = total + self.head_reg_fisher * ((self.head_fisher[name] + self.options.eps) * diff2).sum()
            elif self.head_reg_fisher > 0:
                total = total + self.head_reg_fisher * self.options.eps * diff2.sum()
            total = total + self.options.head_reg_l2 * diff2.sum()
        return total

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

    def optimizer_step(self):
        if self.options.reg_step == "decoupled":
            self._decoupled_regularizer_step()
        self.optimizer.step()

    @torch.no_grad()
    def _decoupled_regularizer_step(self) -> None:
        """θ ← θ − s_e ∇R with s_e = lr_e / lr (cosine factor), per-parameter gradient norm clipped."""
        scale = self.optimizer.param_groups[0]["lr"] / self.train_config.lr
        steps: list[tuple[nn.Parameter, torch.Tensor]] = []
        with torch.enable_grad():
            reg = self.backbone_reg_grads()
            if reg is not None:
                params = self.pool.task_parameters(self.task)
                steps += list(zip(params, R.chain_to_params(reg[0], reg[1], params)))
            head = self.head_penalty()
            if head is not None:
                params = list(self.model.heads.heads[self.task].parameters())
                steps += list(zip(params, torch.autograd.grad(head, params)))
        for p, g in steps:
            norm = g.norm()
            if norm > self.options.clip_grad:
                g = g * (self.options.clip_grad / norm)
            p.sub_(scale * g)

    def _after_training_epoch(self, **kwargs):
        super()._after_training_epoch(**kwargs)
        if self.scheduler is not None:
            self.scheduler.step()

    def _after_training_exp(self, **kwargs):
        t = self.task
        self.pool.freeze(t)
        for p in self.model.heads.heads[t].parameters():
            p.requires_grad_(False)
        if self.options.align_trained_heads and self.stats.params:
            self._align_trained_heads()
        self.model.invalidate()
        super()._after_training_exp(**kwargs)

    def _align_trained_heads(self) -> None:
        """Classifier alignment of the heads used at inference on the θ0 feature statistics of all seen classes
        (rehearsal-free: only the per-class Gaussians are kept); the heads stay frozen afterwards."""
        heads, opts = self.model.heads, self.options
        for p in heads.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            align_classifier(
                heads,
                self.stats,
                opts.align_epochs + opts.align_epochs_per_task * self.task,
                opts.align_lr,
                opts.align_per_class,
                opts.align_temperature,
                128,
                self._rng(),
            )
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
            row = second_order_diagnostics(self.model, self._diag_batches, self.fisher)
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
            "lambda": None,
            "diagnostics": self.diagnostics,
        }

    def save_artifacts(self, folder: Path) -> list[str]:
        path = save_task_vectors(self.model, Path(folder) / "task_vectors.safetensors", method=self.method)
        return [path.name]
