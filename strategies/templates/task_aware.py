"""Task-aware strategies on a :class:`~clcompose.strategies.templates.network.TaskProgramNet`: per-task
programs ξ_t, statistics and heads around one shared body, routed by the stream's task labels.

- :class:`TemplateFinetune` (``template-finetune``): each experience trains the body and the task's ξ_t and
  head (lower bound; with ``backbone.sharing=unshared`` this is the same-size unshared network);
- :class:`TemplateProgram` (``template-program``): the first experience trains everything; afterwards only ξ_t
  and the head train, so the body and every earlier task are untouched (zero forgetting by construction);
- :class:`TemplateEWC` (``template-ewc``): fine-tuning plus (λ/2) Σ_s F_s (θ − θ*_s)² on the shared parameters
  (the template bank, or the whole body) through :class:`~clcompose.strategies.templates.ewc.SharedEWCPlugin`;
- :class:`TemplateJointTraining` (``template-joint``): all tasks at once, task-balanced batches (multi-task
  upper bound).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from avalanche.training import JointTraining
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig, template_kwargs
from clcompose.strategies.templates.bookkeeping import ProgramBookkeeping
from clcompose.strategies.templates.ewc import SharedEWCPlugin
from clcompose.strategies.templates.network import TaskProgramNet, TemplateMixtureNet, body_of, recalibrate_statistics
from clcompose.strategies.templates.options import ProgramOptions, TemplateEWCOptions
from clcompose.strategies.templates.programs import (
    dataset_inputs,
    experience_tasks,
    most_similar_task,
    optimizer_for,
    sample_examples,
    task_data,
)


class TaskProgramViews(ProgramBookkeeping):
    """What the task-aware strategies (a :class:`TaskProgramNet`) report, and their statistics' recalibration."""

    mode: ClassVar[str]  # stored in the record's strategy extras
    _ladder_copy: torch.Tensor | None = None

    def _recalibrate(self, tasks) -> None:
        if not self.options.recalibrate:
            return
        for t in tasks:
            data = task_data(self.adapted_dataset, t)
            recalibrate_statistics(
                self.model.norms[str(t)],
                lambda x, t=t: self.model(x, t),
                dataset_inputs(data, self.train_config.eval_batch_size, self.device),
            )

    # ------------------------------------------------------------------ state views
    def body(self) -> TemplateMixtureNet:
        return self.model.body

    def current_programs(self) -> dict[int, torch.Tensor]:
        return {
            t: self.model.program(t).detach().clone() for t in self.model.tasks if self.model.program(t) is not None
        }

    def ladder_start(self) -> torch.Tensor | None:
        programs = self.current_programs()
        if not programs or self.options.program_init == "uniform":
            return None
        if self.options.program_init == "mean":
            return torch.stack(list(programs.values())).mean(0)
        return self._ladder_copy  # copy: the program chosen on the held-out data in final_metrics

    def final_metrics(self, benchmark=None):
        heldout = getattr(benchmark, "heldout", None)
        if heldout and self.options.program_init == "copy" and self.ladder_result is None and self.current_programs():
            x, y = sample_examples(heldout["train"], self.options.similarity_examples, self.device)
            source = most_similar_task(self.body(), self.current_programs(), x, y)
            self._ladder_copy = self.current_programs()[source]
            self.copied_from["heldout"] = source
        return super().final_metrics(benchmark)

    def parameter_counts(self) -> dict[str, float]:
        tasks = self.model.tasks
        per_task = [sum(p.numel() for p in self.model.task_parameters(t)) for t in tasks]
        stats = [self.model.norms[str(t)].statistics_count() for t in tasks]
        return {
            "params_per_task": float(sum(per_task) / len(per_task)) if per_task else None,
            "statistics_per_task": float(sum(stats) / len(stats)) if stats else None,
            "shared_params": float(sum(p.numel() for p in self.body().parameters())),
        }


# --------------------------------------------------------------------------- sequential training


class TemplateFinetune(TaskProgramViews, SupervisedTemplate):
    """Sequential training of a :class:`TaskProgramNet`: each experience trains the body, the new task's
    program ξ_t and its head (the base of the other sequential strategies, which restrict what trains).

    A new task's program starts near-uniform (``program_init=uniform``: ξ ~ U[0, 1), the reference init), as a
    copy of the most similar earlier task's (``copy``) or as the mean of the earlier programs (``mean``).
    """

    mode = "finetune"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: ProgramOptions,
        train: TrainConfig,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        net = model if isinstance(model, TaskProgramNet) else TaskProgramNet(body_of(model))
        self.options = options
        self._init_bookkeeping(options, train)
        self.copied_from: dict[int, int] = {}
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)  # replaced per experience
        super().__init__(**template_kwargs(net, train, evaluator, device, plugins, optimizer=placeholder))

    # ------------------------------------------------------------------ experience set-up
    def trained_body_parameters(self, first: bool) -> list[nn.Parameter]:
        """The body's parameters that train in this experience (``first``: the stream's first experience)."""
        return list(self.body().parameters())

    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        known = set(self.model.tasks)
        self.model = self.model_adaptation()
        new = [t for t in self.model.tasks if t not in known]
        first = not known
        for t in new:
            self._init_program(t)
        for p in self.model.parameters():
            p.requires_grad_(False)
        body_params = self.trained_body_parameters(first)
        heads = [p for t in new for p in self.model.heads[str(t)].parameters()]
        programs = [self.model.program(t) for t in new if self.model.program(t) is not None]
        for p in body_params + heads + programs:
            p.requires_grad_(True)
        self.optimizer = optimizer_for(
            [(body_params + heads, 1.0), (programs, self.options.program_lr_scale)], self.train_config
        )

    def make_optimizer(self, **kwargs):
        """Built per experience in :meth:`check_model_and_optimizer` (only what trains in it)."""

    @torch.no_grad()
    def _init_program(self, task: int) -> None:
        xi = self.model.program(task)
        earlier = {t: p for t, p in self.current_programs().items() if t != task}
        if xi is not None and earlier and self.options.program_init != "uniform":
            if self.options.program_init == "mean":
                xi.copy_(torch.stack(list(earlier.values())).mean(0))
            else:
                x, y = sample_examples(
                    task_data(self.adapted_dataset, task), self.options.similarity_examples, self.device
                )
                source = most_similar_task(self.body(), earlier, x, y)
                xi.copy_(earlier[source])
                self.copied_from[task] = source
        if xi is not None:
            self.initial_programs[task] = xi.detach().clone()

    def _after_training_exp(self, **kwargs):
        self._recalibrate(experience_tasks(self.experience))
        self._log_programs(len(self.model.tasks))
        super()._after_training_exp(**kwargs)  # plugins (e.g. template EWC's Fisher) see the recalibrated statistics

    # ------------------------------------------------------------------ record hooks
    def record_extras(self) -> dict:
        return {"mode": self.mode, "copied_from": self.copied_from or None, **self.program_extras()}


class TemplateProgram(TemplateFinetune):
    """Program transfer: the first experience trains everything; afterwards only ξ_t and head_t train, so the
    body and every earlier task stay as they were (no forgetting by construction)."""

    mode = "program"

    def trained_body_parameters(self, first: bool) -> list[nn.Parameter]:
        return super().trained_body_parameters(first) if first else []


class TemplateEWC(TemplateFinetune):
    """Fine-tuning with EWC on the shared parameters (:class:`SharedEWCPlugin`, first in the plugins).

    With ``scope=bank`` (the paper's row) only the template bank ``bank.*``, ξ_t and head_t train after the first
    experience, stem and adapter frozen; with ``scope=shared`` the whole body trains, all of it penalised.
    """

    mode = "ewc"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: TemplateEWCOptions,
        train: TrainConfig,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        self.ewc = SharedEWCPlugin.from_options(options)
        super().__init__(
            model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=[self.ewc, *plugins]
        )

    def trained_body_parameters(self, first: bool) -> list[nn.Parameter]:
        if self.options.scope == "bank" and not first:
            return [p for n, p in self.body().named_parameters() if n.startswith("bank.")]
        return super().trained_body_parameters(first)

    @property
    def anchors(self) -> list[dict[str, torch.Tensor]]:
        """θ*_s per past task (the plugin's)."""
        return self.ewc.anchors

    @property
    def fishers(self) -> list[dict[str, torch.Tensor]]:
        """F_s per past task (the plugin's)."""
        return self.ewc.fishers

    def shared_fisher(self, task: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ*_t and the diagonal true Fisher of the EWC parameters now (see :meth:`SharedEWCPlugin.anchor_and_fisher`)."""
        return self.ewc.anchor_and_fisher(self, task)


# --------------------------------------------------------------------------- joint training


class TemplateJointTraining(TaskProgramViews, JointTraining):
    """Multi-task training of every task's program, statistics and head and the shared body at once
    (Avalanche's task-balanced batches: each step sees every task)."""

    mode = "joint"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: ProgramOptions,
        train: TrainConfig,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        net = TaskProgramNet(body_of(model))
        self.options = options
        self._init_bookkeeping(options, train)
        self.copied_from = {}
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)
        super().__init__(**template_kwargs(net, train, evaluator, device, plugins, optimizer=placeholder))

    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        self.model = self.model_adaptation()
        for t in self.model.tasks:
            xi = self.model.program(t)
            if xi is not None:
                self.initial_programs[t] = xi.detach().clone()
        programs = [self.model.program(t) for t in self.model.tasks if self.model.program(t) is not None]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("programs.")]
        self.optimizer = optimizer_for([(rest, 1.0), (programs, self.options.program_lr_scale)], self.train_config)

    def make_optimizer(self, **kwargs):
        """Built in :meth:`check_model_and_optimizer`."""

    def _after_training_exp(self, **kwargs):
        self._recalibrate(self.model.tasks)
        self._log_programs(len(self.model.tasks))
        super()._after_training_exp(**kwargs)

    def record_extras(self) -> dict:
        return {"mode": self.mode, **self.program_extras()}


# --------------------------------------------------------------------------- registration


@STRATEGIES.register("template-finetune", ProgramOptions)
def template_finetune(
    model, options: ProgramOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Template network: body, ξ_t and head train on every experience (lower bound)."""
    return TemplateFinetune(
        model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins
    )


@STRATEGIES.register("template-program", ProgramOptions)
def template_program(
    model, options: ProgramOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Template network: after the first experience only ξ_t and the head train (no forgetting)."""
    return TemplateProgram(
        model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins
    )


@STRATEGIES.register("template-ewc", TemplateEWCOptions)
def template_ewc(
    model, options: TemplateEWCOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Template network fine-tuned with EWC on the shared template bank / body."""
    return TemplateEWC(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)


@STRATEGIES.register("template-joint", ProgramOptions)
def template_joint(
    model, options: ProgramOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """Template network trained on all tasks at once, task-balanced batches (multi-task upper bound)."""
    return TemplateJointTraining(
        model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins
    )
