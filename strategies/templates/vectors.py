"""ITA / IEL (:mod:`clcompose.strategies.task_vectors.ita`, :mod:`clcompose.strategies.task_vectors.iel`) with
task vectors on the mixture logits of a template network (``template-ita``, ``template-iel``).

The first experience trains the whole network, which then is θ0 (statistics frozen), and τ_t lives on ξ only;
inference is task-agnostic, with the composed program ξ0 + (1/T) Σ τ_t and all heads concatenated. With
``program_init=copy`` / ``mean`` a new τ_t starts from the most similar earlier one or their mean (τ = 0, the
base program, by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from clcompose.strategies.core.heads import mask_to_classes
from clcompose.strategies.core.registry import STRATEGIES, ConfigError
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.metrics import templates as TM
from clcompose.strategies.task_vectors.composable import ComposableNet
from clcompose.strategies.task_vectors.iel import IEL
from clcompose.strategies.task_vectors.ita import ITA
from clcompose.strategies.templates.bookkeeping import ProgramBookkeeping
from clcompose.strategies.templates.network import ProgramNet, TemplateMixtureNet, recalibrate_statistics
from clcompose.strategies.templates.options import TemplateIELOptions, TemplateITAOptions
from clcompose.strategies.templates.programs import dataset_inputs, most_similar_task, optimizer_for, sample_examples


class TemplateVectors(ProgramBookkeeping):
    """Task vectors on ξ of a :class:`ProgramNet`, mixed into a task-vector strategy (:class:`TemplateITA`,
    :class:`TemplateIEL`; the strategy's ``train_composition`` says how training composes the vectors).

    The first experience first trains the whole network (body, ξ0, statistics, its head) like every other
    template strategy; that network is θ0: its statistics are frozen and its parameters stay fixed, and the
    task vectors τ_t (one per experience, the first included) move only the mixture logits.
    Evaluation is task-agnostic: ξ0 + (1/T) Σ τ_t for every input and all heads concatenated. The task-aware
    accuracy of the same composed model (argmax within the experience's own classes) is recorded too.
    """

    def __init__(
        self, *, model: nn.Module, options, train: TrainConfig, evaluator=None, device="cpu", plugins: Sequence = ()
    ):
        backbone = getattr(model, "backbone", model)
        if not isinstance(backbone, ProgramNet):
            raise ConfigError(
                "template-ita/template-iel need the template-mixture backbone (--backbone template-mixture)"
            )
        if backbone.xi is None:
            raise ConfigError("template-ita/template-iel need a program to tune: backbone.sharing must be 'templates'")
        net = ComposableNet(
            backbone, backbone.out_features, options.tuning, options.rank, ["xi"], self.train_composition
        )
        self._init_bookkeeping(options, train)
        self.options = options
        self.pretrained = False
        self.initial_base: torch.Tensor | None = None
        self.task_aware_rows: list[list[float]] = []
        self._aware_counts: dict[int, list[int]] = {}
        super().__init__(model=net, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)

    # ------------------------------------------------------------------ views
    def body(self) -> TemplateMixtureNet:
        return self.model.backbone.body

    def base_logits(self) -> torch.Tensor:
        """ξ0, the program of θ0."""
        return self.model.backbone.xi.detach()

    def current_programs(self) -> dict[int, torch.Tensor]:
        """ξ0 + τ_t per experience (the task's own program; inference uses the composition)."""
        base = self.base_logits()
        return {t: (base + self.pool.deltas(t)["xi"].detach()).clone() for t in range(self.pool.num_tasks)}

    def composed_logits(self) -> torch.Tensor:
        """The program inference uses: ξ0 + Σ_t c_t τ_t."""
        with torch.no_grad():
            return self.model.pool.weights(self.model.composed_coefficients())["xi"].detach().clone()

    def ladder_start(self) -> torch.Tensor | None:
        return self.composed_logits() if self.pool.num_tasks else None

    def parameter_counts(self) -> dict[str, float]:
        t = self.pool.num_tasks
        head = [sum(p.numel() for p in h.parameters()) for h in self.model.heads.heads]
        per_task = [self.pool.trainable_count(s) + head[s] for s in range(t)]
        # as the task-aware strategies count: parameters only (the shared program ξ0 is one); θ0's normalisation
        # statistics are shared by every task here, so none are per task
        return {
            "params_per_task": float(sum(per_task) / t) if t else None,
            "statistics_per_task": 0.0,
            "shared_params": float(sum(p.numel() for p in self.body().parameters()) + self.base_logits().numel()),
        }

    # ------------------------------------------------------------------ the first experience: θ0
    def _prepare_experience(self) -> None:
        if not self.pretrained:
            self._train_base_network()
        super()._prepare_experience()
        t = self.task
        # the programs' learning rate, as in the other template strategies (the head keeps train.lr)
        head = list(self.model.heads.heads[t].parameters())
        self.optimizer = optimizer_for(
            [(head, 1.0), (self.pool.task_parameters(t), self.options.program_lr_scale)], self.train_config
        )
        if self.scheduler is not None:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.scheduler.lr_lambdas[0])
        if t > 0 and self.options.program_init != "uniform":
            self._init_vector(t)
        if t not in self.initial_programs:
            self.initial_programs[t] = self.current_programs()[t]

    def _train_base_network(self) -> None:
        """Train body, ξ0, statistics and the first head on the first experience (CE on its classes)."""
        backbone, head = self.model.backbone, self.model.heads.heads[0]
        classes = self.model.heads.head_classes[0]
        self.initial_base = self.base_logits().clone()
        params = [p for n, p in backbone.named_parameters() if n != "xi"] + list(head.parameters())
        for p in params + [backbone.xi]:
            p.requires_grad_(True)
        opt = optimizer_for([(params, 1.0), ([backbone.xi], self.options.program_lr_scale)], self.train_config)
        loader = DataLoader(self.adapted_dataset, batch_size=self.train_config.batch_size, shuffle=True)
        backbone.train()
        for _ in range(self.train_config.epochs):
            for x, y, *_ in loader:
                x, y = x.to(self.device), y.to(self.device)
                opt.zero_grad()
                F.cross_entropy(mask_to_classes(self.model.heads(backbone(x)), classes), y).backward()
                opt.step()
        if self.options.recalibrate:
            recalibrate_statistics(
                backbone.norms,
                backbone,
                dataset_inputs(self.adapted_dataset, self.train_config.eval_batch_size, self.device),
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.freeze_statistics()
        self.model.invalidate()
        self.pretrained = True

    @torch.no_grad()
    def _init_vector(self, t: int) -> None:
        earlier = {s: self.pool.deltas(s)["xi"].detach() for s in range(t)}
        if self.options.program_init == "mean":
            start = torch.stack(list(earlier.values())).mean(0)
        else:
            data = self.adapted_dataset
            x, y = sample_examples(data, self.options.similarity_examples, self.device)
            programs = {s: self.base_logits() + d for s, d in earlier.items()}
            start = earlier[most_similar_task(self.body(), programs, x, y)]
        self.pool.vectors[t][0].delta.copy_(start)
        self.model.invalidate()

    def _after_training_exp(self, **kwargs):
        super()._after_training_exp(**kwargs)
        self._log_programs(self.pool.num_tasks)
        composed = TM.mixture_entropy(self.composed_logits().cpu().numpy())
        self.program_rows[-1]["composed_entropy"] = sum(composed) / len(composed)

    # ------------------------------------------------------------------ task-aware accuracy of the composed model
    def _before_eval(self, **kwargs):
        self._aware_counts = {}
        super()._before_eval(**kwargs)

    def _after_eval_iteration(self, **kwargs):
        super()._after_eval_iteration(**kwargs)
        exp = self.experience.current_experience
        classes = sorted(self.experience.classes_in_this_experience)
        pred = torch.tensor(classes, device=self.mb_output.device)[self.mb_output[:, classes].argmax(1)]
        counts = self._aware_counts.setdefault(exp, [0, 0])
        counts[0] += int((pred == self.mb_y).sum())
        counts[1] += len(self.mb_y)

    def _after_eval(self, **kwargs):
        if self._aware_counts and self.pool.num_tasks:
            row = [c / max(1, n) for _, (c, n) in sorted(self._aware_counts.items())]
            self.task_aware_rows = self.task_aware_rows[: self.pool.num_tasks - 1] + [row]
        super()._after_eval(**kwargs)

    def final_metrics(self, benchmark=None):
        metrics = super().final_metrics(benchmark)
        if self.initial_base is not None:  # every program starts from ξ0: before training = ξ0's U[0, 1) draw
            base_start = TM.mixture_entropy(self.initial_base.cpu().numpy())
            metrics["mixture_entropy_init"] = float(sum(base_start) / len(base_start))
            base = TM.mixture_entropy(self.base_logits().cpu().numpy())
            metrics["mixture_entropy_base"] = float(sum(base) / len(base))
        if self.task_aware_rows:
            last = self.task_aware_rows[-1][: self.pool.num_tasks]
            metrics["task_aware_accuracy"] = float(sum(last) / len(last))
        return metrics

    def record_extras(self) -> dict:
        extras = super().record_extras()  # the task-vector strategy's (ProgramBookkeeping has none)
        own = self.program_extras()
        diagnostics = extras.pop("diagnostics") or []
        for row in own.pop("diagnostics"):  # one row per experience: merge ITA's with the programs'
            match = next((d for d in diagnostics if d.get("tasks") == row["tasks"]), None)
            if match is not None:
                match.update(row)
            else:
                diagnostics.append(row)
        return (
            extras
            | own
            | {
                "diagnostics": diagnostics,
                "task_aware_accuracy_matrix": self.task_aware_rows,
                "initial_base_program": self.initial_base.tolist() if self.initial_base is not None else None,
            }
        )


class TemplateITA(TemplateVectors, ITA):
    """ITA with task vectors on ξ: each τ_t trains from θ0 alone (see :class:`TemplateVectors`)."""


class TemplateIEL(TemplateVectors, IEL):
    """IEL with task vectors on ξ: τ_t trains through the composed program (see :class:`TemplateVectors`)."""


# --------------------------------------------------------------------------- registration


@STRATEGIES.register("template-ita", TemplateITAOptions)
def template_ita(
    model, options: TemplateITAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """ITA with task vectors on the programs ξ of a template network; task-agnostic composed inference."""
    return TemplateITA(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)


@STRATEGIES.register("template-iel", TemplateIELOptions)
def template_iel(
    model, options: TemplateIELOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """IEL with task vectors on the programs ξ of a template network; task-agnostic composed inference."""
    return TemplateIEL(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
