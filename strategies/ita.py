"""ITA and IEL (Porrello et al., ICLR 2025) and the task-arithmetic baseline, as Avalanche strategies.

All three train one task vector τ_t per experience from the frozen pre-trained θ0 and evaluate the composed
model θ0 + Σ_t c_t τ_t (c_t = 1/T by default) with one head per experience, concatenated in label space.

- **ITA**  trains θ0 + τ_t alone: CE on the current classes (past logits masked) + (α/2) Σ F̂ τ_t², with F̂
  the diagonal true Fisher at θ0 of the *past* experiences (first experience: F̂ = ε, i.e. effectively
  unregularised, as in the reference code).
- **IEL**  trains through the composed model θ0 + (1/T)(Σ_{s<T} sg[τ_s] + τ_T) + (β/2) Σ_s ‖τ_s − τ̄‖²_F̄,
  F̄ the cumulative Fisher including the current experience; closed-form gradient with the past sum cached.
- **Task arithmetic** fine-tunes each τ_t from θ0 with no regulariser; composition by average, or by sum
  with a scaling λ chosen on validation data held out from the training experiences (never the test set).

Both ITA and IEL use task pre-consolidation (linear probe + classifier alignment on frozen θ0 features →
anchor heads), a head regulariser toward the anchor, and apply the regulariser either as a *decoupled* plain
SGD step scaled by the learning-rate schedule (separate from AdamW; the reference code's update) or as a
*coupled* loss term.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from strategies import regularizers as R
from strategies.common import TrainConfig, make_optimizer, template_kwargs
from strategies.consolidation import ClassGaussians, anchor_heads
from strategies.fisher import FisherAccumulator, fisher_sum
from strategies.heads import ExperienceHeads, mask_to_classes
from strategies.registry import STRATEGIES, Options
from strategies.task_vectors import TaskVectorPool


class ComposableNet(nn.Module):
    """θ0 + task-vector pool + one head per experience.

    In training mode the backbone runs at ``θ0 + τ_T`` (``train_composition="individual"``, ITA/TA) or at the
    composed ``θ0 + (1/T)(Σ_{s<T} sg[τ_s] + τ_T)`` (``"composed"``, IEL). In eval mode it runs at
    ``θ0 + Σ_t c_t τ_t`` with ``coefficients`` (default 1/T each), cached until the next ``train()``.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, style: str = "lora", rank: int = 4, layers="all",
                 train_composition: Literal["individual", "composed"] = "individual"):  # fmt: skip
        super().__init__()
        self.pool = TaskVectorPool(backbone, layers=layers, style=style, rank=rank)
        self.heads = ExperienceHeads(feature_dim, freeze_old=True)
        self.train_composition = train_composition
        self.coefficients: list[float] | None = None
        self._past_sum: dict[str, torch.Tensor] | None = None  # Σ_{s<T} ΔW_s, detached (IEL forward)
        self._eval_weights: dict[str, torch.Tensor] | None = None

    @property
    def backbone(self) -> nn.Module:
        return self.pool.model

    def train(self, mode: bool = True):
        self._eval_weights = None
        return super().train(mode)

    def invalidate(self) -> None:
        self._past_sum = None
        self._eval_weights = None

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
            if self.train_composition == "individual":
                return {n: base[n] + current[n] for n in self.pool.names}
            past = self.past_sum()
            return {n: base[n] + (past[n] + current[n]) / t for n in self.pool.names}
        if self._eval_weights is None:
            with torch.no_grad():
                self._eval_weights = self.pool.weights(self.composed_coefficients())
        return self._eval_weights

    def features(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.pool.forward_with(self.backbone_weights() if weights is None else weights, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x))

    def individual_weights(self, t: int) -> dict[str, torch.Tensor]:
        """θ0 + τ_t (coefficient 1)."""
        base, delta = self.pool.base_weights(), self.pool.deltas(t)
        return {n: base[n] + delta[n] for n in self.pool.names}


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
        for name in ("align_per_class", "probe_batch_size", "gaussian_components", "fisher_topk", "fisher_mc_samples", "fisher_chunk", "diagnostics_examples"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.fisher_max_examples is None or self.fisher_max_examples >= 1, "fisher_max_examples", "must be >= 1")
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
        self.require(bool(self.lambda_grid) and all(v > 0 for v in self.lambda_grid), "lambda_grid", "must hold positive values")


class TaskVectorStrategy(SupervisedTemplate):
    """The shared training procedure of ITA, IEL and task arithmetic (see the module docstring)."""

    def __init__(self, *, model: nn.Module, options: TaskVectorOptions, train: TrainConfig, method: Literal["ita", "iel", "ta"],
                 alpha: float = 0.0, beta: float = 0.0, evaluator=None, device="cpu", plugins: Sequence = ()):  # fmt: skip
        if not isinstance(model, ComposableNet):
            backbone = getattr(model, "backbone", model)
            dim = model.heads.in_features if hasattr(model, "heads") else backbone.out_features
            composition = "composed" if method == "iel" else "individual"
            model = ComposableNet(backbone, dim, options.tuning, options.rank, _layers(options.layers), composition)
        self.options, self.train_config, self.method = options, train, method
        self.alpha, self.beta = alpha, beta
        self.head_reg_fisher = options.head_reg_fisher if options.head_reg_fisher is not None else (alpha if method == "ita" else beta)
        self.head_fisher_classes = options.head_fisher_classes or ("past" if method == "ita" else "all")
        self.fisher = FisherAccumulator(options.eps)
        self.stats = ClassGaussians(options.gaussian_components)
        self.anchor: ExperienceHeads | None = None
        self.head_fisher: dict[str, torch.Tensor] | None = None
        self.lambdas: list[float] = []
        self.val_sets: list = []
        self.diagnostics: list[dict] = []
        self.prep_times: list[dict] = []
        self._diag_batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)  # replaced per experience
        super().__init__(**template_kwargs(model, train, evaluator, device, plugins, optimizer=placeholder))
        self.scheduler = None

    # ------------------------------------------------------------------ helpers
    @property
    def pool(self) -> TaskVectorPool:
        return self.model.pool

    @property
    def task(self) -> int:
        return self.pool.num_tasks - 1

    def _needs_fisher(self) -> bool:
        return (self.method == "ita" and self.alpha > 0) or (self.method == "iel" and self.beta > 0)

    def _needs_anchor(self) -> bool:
        return self._needs_fisher() or self.head_reg_fisher > 0 or self.options.head_reg_l2 > 0

    def _rng(self) -> torch.Generator:
        # a private stream drawn from the global one, so pre-consolidation stays reproducible per seed
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

    def _loader(self, dataset, shuffle: bool = False):
        return DataLoader(dataset, batch_size=self.train_config.eval_batch_size, shuffle=shuffle,
                          collate_fn=getattr(dataset, "collate_fn", None))  # fmt: skip

    @torch.no_grad()
    def _base_features(self, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ0 features, labels and inputs of a dataset (no task vector applied)."""
        feats, labels, inputs = [], [], []
        base = self.pool.base_weights()
        was_training = self.model.training
        self.model.eval()
        for batch in self._loader(dataset):
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            feats.append(self.pool.forward_with(base, x))
            labels.append(y)
            inputs.append(x)
        self.model.train(was_training)
        return torch.cat(feats), torch.cat(labels), torch.cat(inputs)

    # ------------------------------------------------------------------ experience set-up
    def train_dataset_adaptation(self, **kwargs):
        super().train_dataset_adaptation(**kwargs)
        if self.method == "ta" and self.options.composition == "sum":
            n = len(self.adapted_dataset)
            n_val = max(1, int(round(n * self.options.val_fraction)))
            perm = torch.randperm(n).tolist()
            self.val_sets.append(self.adapted_dataset.subset(perm[:n_val]))
            self.adapted_dataset = self.adapted_dataset.subset(perm[n_val:])

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
                self.model.heads, self.stats, feats, labels,
                probe_epochs=opts.probe_epochs, probe_lr=opts.probe_lr, probe_batch_size=opts.probe_batch_size,
                align_epochs=opts.align_epochs + opts.align_epochs_per_task * t, align_lr=opts.align_lr,
                align_per_class=opts.align_per_class, align_temperature=opts.align_temperature,
                batch_size=128, generator=gen,
            )  # fmt: skip
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
        self._fisher_now = self._regularizer_fisher()
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
        return fisher_sum(log_prob, pool.base_weights(), batches, mode=opts.fisher, k=opts.fisher_topk,
                          samples=opts.fisher_mc_samples, chunk=opts.fisher_chunk, generator=gen)  # fmt: skip

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

    def _regularizer_fisher(self) -> dict[str, torch.Tensor] | None:
        if not self._needs_fisher():
            return None
        if self.method == "ita":
            return self.fisher.past(self.task, self.pool.base_weights())
        return self.fisher.upto(self.task)

    # ------------------------------------------------------------------ regularisers
    def backbone_reg_grads(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(ΔW_T with graph, closed-form ∂R/∂ΔW_T) or None when the backbone is unregularised."""
        if self._fisher_now is None:
            return None
        current = self.pool.deltas(self.task)
        if self.method == "ita":
            return current, R.ita_grad(self.alpha, self._fisher_now, current)
        past = self.model.past_sum() if self.task > 0 else None
        return current, R.iel_grad(self.beta, self._fisher_now, current, past, self.task + 1)

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
        if self.method == "ta":
            self.model.coefficients = self._select_lambda() if self.options.composition == "sum" else None
        super()._after_training_exp(**kwargs)

    def _align_trained_heads(self) -> None:
        """Classifier alignment of the heads used at inference on the θ0 feature statistics of all seen classes
        (rehearsal-free: only the per-class Gaussians are kept); the heads stay frozen afterwards."""
        from strategies.consolidation import align_classifier

        heads, opts = self.model.heads, self.options
        for p in heads.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            align_classifier(heads, self.stats, opts.align_epochs + opts.align_epochs_per_task * self.task, opts.align_lr,
                             opts.align_per_class, opts.align_temperature, 128, self._rng())  # fmt: skip
        for p in heads.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ task arithmetic: λ on validation data
    @torch.no_grad()
    def _select_lambda(self) -> list[float]:
        """The λ of θ0 + λ Σ τ_t with the best accuracy on the held-out validation data of seen experiences."""
        data = [(x.to(self.device), y.to(self.device)) for ds in self.val_sets for x, y, *_ in self._loader(ds)]
        was_training = self.model.training
        self.model.eval()
        best, best_acc = None, -1.0
        for lam in self.options.lambda_grid:
            self.model.coefficients = [lam] * self.pool.num_tasks
            self.model.invalidate()
            correct = sum(int((self.model(x).argmax(1) == y).sum()) for x, y in data)
            acc = correct / max(1, sum(len(y) for _, y in data))
            if acc > best_acc:
                best, best_acc = lam, acc
        self.model.train(was_training)
        n_val = sum(len(y) for _, y in data)
        self.lambdas.append({"experience": self.task, "lambda": best, "val_accuracy": best_acc, "val_examples": n_val})
        return [best] * self.pool.num_tasks

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
            self._diag_batches.append((self.mb_x[idx].detach(), self.mb_y[idx].detach(), self.experience.current_experience))

    def _after_eval(self, **kwargs):
        if self.options.diagnostics and self._diag_batches and self.pool.num_tasks > 0:
            from strategies.diagnostics import second_order_diagnostics

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
            "preparation": [{k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()} for d in self.prep_times],
            "lambda": self.lambdas or None,
            "diagnostics": self.diagnostics,
        }

    def save_artifacts(self, folder: Path) -> list[str]:
        from strategies.skills import save_task_vectors

        path = save_task_vectors(self.model, Path(folder) / "task_vectors.safetensors", method=self.method)
        return [path.name]


def _layers(spec: str):
    return spec if spec in ("all", "linear", "conv") else [p.strip() for p in spec.split(",") if p.strip()]


@STRATEGIES.register("ita", ITAOptions)
def ita(model, options: ITAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Incremental Task Arithmetic: τ_t from θ0 alone + (α/2)ΣF̂τ_t²; evaluate θ0 + (1/T)Στ_s."""
    return TaskVectorStrategy(model=model, options=options, train=train, method="ita", alpha=options.alpha,
                              evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip


@STRATEGIES.register("iel", IELOptions)
def iel(model, options: IELOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Incremental Ensemble Learning: train the composed model + (β/2)Σ_s‖τ_s − τ̄‖²_F̄."""
    return TaskVectorStrategy(model=model, options=options, train=train, method="iel", beta=options.beta,
                              evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip


@STRATEGIES.register("task-arithmetic", TaskArithmeticOptions)
def task_arithmetic(model, options: TaskArithmeticOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Task arithmetic: independent τ_t from θ0, no regulariser; sum with validated λ, or average."""
    return TaskVectorStrategy(model=model, options=options, train=train, method="ta",
                              evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip
