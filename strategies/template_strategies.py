"""Continual-learning strategies on template-mixture networks (Zhmoginov et al., arXiv 2107.10963).

Every strategy takes the run's model built around the ``template-mixture`` backbone and keeps its shared
body (stem, template bank, output adapter). On a task-labelled stream (e.g. the ``domains`` benchmark):

- ``template-joint``    all tasks at once, task-balanced batches (multi-task upper bound);
- ``template-finetune`` each experience trains the body and the task's program ξ_t and head (lower bound;
                        with ``backbone.sharing=unshared`` this is the same-size unshared network);
- ``template-program``  the first experience trains everything; afterwards only ξ_t and the head train, so
                        the body and every earlier task are untouched (zero forgetting by construction);
- ``template-ewc``      fine-tuning plus (λ/2) Σ_s F_s (θ − θ*_s)² on the shared parameters (the template
                        bank, or the whole body), F_s the diagonal true Fisher at the end of experience s;
- ``template-ita`` / ``template-iel``: ITA / IEL (:mod:`strategies.ita`) with task vectors on the mixture
                        logits: the first experience trains the network, which then is θ0 (statistics
                        frozen), and τ_t lives on ξ only; inference is task-agnostic, with the composed
                        program ξ0 + (1/T) Σ τ_t and all heads concatenated.

A new task's program starts near-uniform (``program_init=uniform``: ξ ~ U[0, 1), the reference init; for
ITA/IEL τ = 0, the base program), as a copy of the most similar earlier task's (``copy``: the program whose
features give the best nearest-class-mean accuracy on the new training data), or as the mean of the earlier
programs (``mean``).

After the stream, each strategy reports (``final_metrics``) the mixture entropy of the programs at their
start and at the end, the template overlap between tasks, the parameters a task adds, and — when the
benchmark holds out a domain — the transfer ladder on it: head only, ξ + head, and full fine-tuning.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from avalanche.training import JointTraining
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from strategies import template_metrics as TM
from strategies.common import TrainConfig, template_kwargs
from strategies.fisher import fisher_sum
from strategies.heads import mask_to_classes
from strategies.ita import ComposableNet, IELOptions, ITAOptions, TaskVectorStrategy
from strategies.registry import STRATEGIES, ConfigError, Options
from strategies.template_mixture import ProgramNet, TaskProgramNet, TemplateMixtureNet, body_of, mixture_of, recalibrate_statistics

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


# --------------------------------------------------------------------------- pieces


def optimizer_for(groups: Sequence[tuple[list[nn.Parameter], float]], train: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over parameter groups (params, lr multiplier)."""
    param_groups = [{"params": ps, "lr": train.lr * scale} for ps, scale in groups if ps]
    if train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=train.lr, weight_decay=train.weight_decay)


def ewc_proximal(theta: torch.Tensor, anchors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], lam: float,
                 lr: float | torch.Tensor) -> torch.Tensor:  # fmt: skip
    """argmin_θ (1/2η)‖θ − θ'‖² + (λ/2) Σ_s F_s (θ − θ*_s)²  =  (θ' + ηλ Σ_s F_s θ*_s) / (1 + ηλ Σ_s F_s), elementwise
    (η a number or a per-coordinate tensor)."""
    weight = sum(fishers) * (lr * lam)
    pull = sum(f * a for f, a in zip(fishers, anchors)) * (lr * lam)
    return (theta + pull) / (1 + weight)


def proximal_step_size(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | float:
    """The step η that the optimiser's last update applied to a gradient of ``p`` at steady state, so that the
    proximal EWC step balances the penalty against the loss at the EWC optimum: SGD lr / (1 − momentum) (momentum
    accumulates the gradient to g / (1 − μ)), Adam/AdamW lr / (√v̂ + ε) per coordinate; anything else lr."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            break
    else:
        raise KeyError("parameter not in the optimiser")
    lr = group["lr"]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = group.get("momentum", 0.0)
        return lr / (1.0 - momentum) if 0 < momentum < 1 else lr
    state = optimizer.state.get(p, {})
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg_sq" in state:
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        return lr / (v_hat.sqrt() + group["eps"])
    return lr


def ewc_penalty(params: dict[str, torch.Tensor], anchors: Sequence[dict], fishers: Sequence[dict], lam: float) -> torch.Tensor:
    """(λ/2) Σ_s Σ_i F_s,i (θ_i − θ*_s,i)²."""
    total = torch.zeros(())
    for anchor, fisher in zip(anchors, fishers):
        for n, p in params.items():
            total = total + (fisher[n] * (p - anchor[n]).pow(2)).sum()
    return 0.5 * lam * total


@torch.no_grad()
def _features_and_labels(model: TaskProgramNet, task: int, data: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    feats = torch.cat([model.features(x, task) for x, _ in data])
    return feats, torch.cat([y for _, y in data])


def nearest_mean_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the nearest-class-mean classifier fitted and scored on (features, labels)."""
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    pred = classes[torch.cdist(features, means).argmin(1)]
    return float((pred == labels).float().mean())


@torch.no_grad()
def most_similar_task(body: TemplateMixtureNet, programs: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> int:
    """The earlier task whose program gives the best nearest-class-mean accuracy on (x, y); statistics are
    the batch's own (fresh statistics in training mode, discarded afterwards). Ties go to the earliest task."""
    best, best_acc = None, -1.0
    for task, logits in programs.items():
        norms = body.new_norms().train()
        acc = nearest_mean_accuracy(body(x, mixture_of(logits), norms), y)
        if acc > best_acc:
            best, best_acc = task, acc
    return best


def _sample(dataset, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a dataset in a random order drawn from the global generator."""
    idx = torch.randperm(len(dataset))[:n].tolist()
    items = [dataset[i] for i in idx]
    return torch.stack([it[0] for it in items]).to(device), torch.tensor([int(it[1]) for it in items], device=device)


def program_summary(programs: dict[int, torch.Tensor], initial: dict[int, torch.Tensor], names: dict[int, str] | None = None) -> dict:
    """Entropy (normalised) at the start and now, the mixtures, and the overlap matrices of a set of programs."""
    tasks = sorted(programs)
    current = [programs[t].detach().cpu().numpy() for t in tasks]
    start = [initial[t].detach().cpu().numpy() for t in tasks if t in initial]
    return {
        "tasks": tasks,
        "names": [names.get(t, str(t)) for t in tasks] if names else [str(t) for t in tasks],
        "entropy_init": [TM.mixture_entropy(p) for p in start],
        "entropy_final": [TM.mixture_entropy(p) for p in current],
        "mixtures": [mixture_of(programs[t].detach().cpu()).tolist() for t in tasks],
        "program_overlap": TM.overlap_matrix(current, "program"),
        "usage_overlap": TM.overlap_matrix(current, "usage"),
        "usage_jsd": TM.overlap_matrix(current, "jsd"),
    }


def _mean(rows: list[list[float]]) -> float | None:
    values = [v for r in rows for v in r]
    return float(sum(values) / len(values)) if values else None


def summary_metrics(summary: dict) -> dict[str, float | None]:
    """Scalars of a :func:`program_summary` for the record's metrics."""
    return {
        "mixture_entropy_init": _mean(summary["entropy_init"]),
        "mixture_entropy_final": _mean(summary["entropy_final"]),
        "template_overlap": TM.mean_offdiagonal(summary["program_overlap"]),
        "template_usage_overlap": TM.mean_offdiagonal(summary["usage_overlap"]),
        "template_usage_jsd": TM.mean_offdiagonal(summary["usage_jsd"]),
    }


def _inputs(dataset, batch_size: int, device):
    """The inputs of a dataset in its own order (for recalibrating statistics)."""
    return (x.to(device) for x, *_ in DataLoader(dataset, batch_size=batch_size))


def _task_data(dataset, task: int):
    return dataset.task_set[task] if hasattr(dataset, "task_set") else dataset


def _train_loop(net: nn.Module, params_and_scales, dataset, train: TrainConfig, epochs: int, generator: torch.Generator,
                device, forward) -> None:  # fmt: skip
    opt = optimizer_for(params_and_scales, train)
    loader = DataLoader(dataset, batch_size=train.batch_size, shuffle=True, generator=generator)
    net.train()
    for _ in range(epochs):
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            F.cross_entropy(forward(x), y).backward()
            opt.step()


@torch.no_grad()
def _accuracy(forward, dataset, batch_size: int, device) -> float:
    correct = total = 0
    for x, y, *_ in DataLoader(dataset, batch_size=batch_size):
        correct += int((forward(x.to(device)).argmax(1) == y.to(device)).sum())
        total += len(y)
    return correct / max(1, total)


def transfer_ladder(body: TemplateMixtureNet, init_logits: torch.Tensor | None, heldout: dict, train: TrainConfig,
                    epochs: int, program_lr_scale: float, seed: int, device="cpu", recalibrate: bool = True) -> dict[str, float | None]:  # fmt: skip
    """Accuracy on a held-out task after training, from the same start (program ``init_logits``, fresh
    statistics and head): the head only; the program ξ and the head; everything (full fine-tuning).
    Runs on copies; the strategy's own model is not changed. ``program`` is None for fixed programs."""
    task, train_ds, test_ds = heldout["task_label"], heldout["train"], heldout["test"]
    classes = sorted(int(c) for c in train_ds.targets.uniques)
    out: dict[str, float | None] = {}
    with torch.random.fork_rng(devices=[]):
        for rung in ("head", "program", "full"):
            torch.manual_seed(seed)
            net = TaskProgramNet(copy.deepcopy(body)).to(device)
            net.add_task(task, classes)
            xi = net.program(task)
            if xi is None and rung == "program":
                out[rung] = None
                continue
            if xi is not None and init_logits is not None:
                with torch.no_grad():
                    xi.copy_(init_logits)
            head = list(net.heads[str(task)].parameters())
            groups = {"head": [(head, 1.0)], "program": [(head, 1.0), ([xi], program_lr_scale)],
                      "full": [(head + list(net.body.parameters()), 1.0), ([xi] if xi is not None else [], program_lr_scale)]}[rung]  # fmt: skip
            for p in net.parameters():
                p.requires_grad_(False)
            for ps, _ in groups:
                for p in ps:
                    p.requires_grad_(True)
            gen = torch.Generator().manual_seed(seed)
            _train_loop(net, groups, train_ds, train, epochs, gen, device, lambda x: net(x, task))
            if recalibrate:
                recalibrate_statistics(net.norms[str(task)], lambda x: net(x, task), _inputs(train_ds, train.eval_batch_size, device))
            net.eval()
            out[rung] = _accuracy(lambda x: net(x, task), test_ds, train.eval_batch_size, device)
    return out


# --------------------------------------------------------------------------- task-aware strategies


class _ProgramBookkeeping:
    """Programs at their start, per-experience diagnostics and the post-stream metrics (shared by all)."""

    def _init_bookkeeping(self, options: ProgramOptions, train: TrainConfig) -> None:
        self.program_options, self.train_config = options, train
        self.initial_programs: dict[int, torch.Tensor] = {}
        self.program_rows: list[dict] = []  # per-experience program diagnostics (ITA/IEL keep their own rows apart)
        self.ladder_result: dict | None = None

    def current_programs(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def ladder_start(self) -> torch.Tensor | None:
        """The program a held-out task starts from (per ``program_init``)."""
        raise NotImplementedError

    def _log_programs(self, tasks: int) -> None:
        programs = self.current_programs()
        if not programs:
            return
        s = program_summary(programs, self.initial_programs)
        row = {"tasks": tasks, "mixture_entropy": _mean(s["entropy_final"])}
        if len(programs) > 1:
            row["template_overlap"] = TM.mean_offdiagonal(s["program_overlap"])
        self.program_rows = [d for d in self.program_rows if d["tasks"] != tasks] + [row]

    def body(self) -> TemplateMixtureNet:
        raise NotImplementedError

    def parameter_counts(self) -> dict[str, float]:
        raise NotImplementedError

    def final_metrics(self, benchmark=None) -> dict[str, float | None]:
        """Scalars for the record's metrics (called by ``bench run`` after the stream)."""
        programs = self.current_programs()
        metrics: dict[str, float | None] = {}
        if programs:
            metrics |= summary_metrics(program_summary(programs, self.initial_programs))
        metrics |= self.parameter_counts()
        heldout = getattr(benchmark, "heldout", None)
        if self.program_options.ladder and heldout:
            if self.ladder_result is None:
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
                epochs = self.program_options.ladder_epochs or self.train_config.epochs
                self.ladder_result = transfer_ladder(self.body(), self.ladder_start(), heldout, self.train_config, epochs,
                                                     self.program_options.program_lr_scale, seed, self.device,
                                                     self.program_options.recalibrate)  # fmt: skip
                self.ladder_result["domain"] = heldout.get("domain")
            r = self.ladder_result
            metrics |= {"ladder_head": r["head"], "ladder_program": r["program"], "ladder_full": r["full"]}
        return metrics

    def program_extras(self, names: dict[int, str] | None = None) -> dict:
        programs = self.current_programs()
        extras = {"programs": program_summary(programs, self.initial_programs, names) if programs else None,
                  "diagnostics": self.program_rows, "ladder": self.ladder_result}  # fmt: skip
        return extras


class _TaskProgramViews(_ProgramBookkeeping):
    """What the task-aware strategies (a :class:`TaskProgramNet`) report, and their statistics' recalibration."""

    def _recalibrate(self, tasks) -> None:
        if not self.options.recalibrate:
            return
        for t in tasks:
            data = _task_data(self.adapted_dataset, t)
            recalibrate_statistics(self.model.norms[str(t)], lambda x, t=t: self.model(x, t),
                                   _inputs(data, self.train_config.eval_batch_size, self.device))  # fmt: skip

    _ladder_copy: torch.Tensor | None = None

    # ------------------------------------------------------------------ state views
    def body(self) -> TemplateMixtureNet:
        return self.model.body

    def current_programs(self) -> dict[int, torch.Tensor]:
        return {t: self.model.program(t).detach().clone() for t in self.model.tasks if self.model.program(t) is not None}

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
            x, y = _sample(heldout["train"], self.options.similarity_examples, self.device)
            source = most_similar_task(self.body(), self.current_programs(), x, y)
            self._ladder_copy = self.current_programs()[source]
            self.copied_from["heldout"] = source
        return super().final_metrics(benchmark)

    def parameter_counts(self) -> dict[str, float]:
        tasks = self.model.tasks
        per_task = [sum(p.numel() for p in self.model.task_parameters(t)) for t in tasks]
        stats = [self.model.norms[str(t)].statistics_count() for t in tasks]
        return {"params_per_task": float(sum(per_task) / len(per_task)) if per_task else None,
                "statistics_per_task": float(sum(stats) / len(stats)) if stats else None,
                "shared_params": float(sum(p.numel() for p in self.body().parameters()))}  # fmt: skip


class TemplateStrategy(_TaskProgramViews, SupervisedTemplate):
    """Sequential training of a :class:`TaskProgramNet` (see the module docstring for the modes)."""

    def __init__(self, *, model: nn.Module, options: ProgramOptions, train: TrainConfig, mode: Literal["finetune", "program", "ewc"],
                 evaluator=None, device="cpu", plugins: Sequence = ()):  # fmt: skip
        net = model if isinstance(model, TaskProgramNet) else TaskProgramNet(body_of(model))
        self.mode, self.options = mode, options
        self._init_bookkeeping(options, train)
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.copied_from: dict[int, int] = {}
        placeholder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=train.lr)  # replaced per experience
        super().__init__(**template_kwargs(net, train, evaluator, device, plugins, optimizer=placeholder))

    # ------------------------------------------------------------------ experience set-up
    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        known = set(self.model.tasks)
        self.model = self.model_adaptation()
        new = [t for t in self.model.tasks if t not in known]
        first = not known
        for t in new:
            self._init_program(t)
        train_body = first or self.mode != "program"
        for p in self.model.parameters():
            p.requires_grad_(False)
        body_params = list(self.body().parameters()) if train_body else []
        if self.mode == "ewc" and self.options.scope == "bank" and not first:  # the paper's row: templates + ξ_t + head_t
            body_params = [p for n, p in self.body().named_parameters() if n.startswith("bank.")]
        heads = [p for t in new for p in self.model.heads[str(t)].parameters()]
        programs = [self.model.program(t) for t in new if self.model.program(t) is not None]
        for p in body_params + heads + programs:
            p.requires_grad_(True)
        self.optimizer = optimizer_for([(body_params + heads, 1.0), (programs, self.options.program_lr_scale)], self.train_config)

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
                x, y = _sample(_task_data(self.adapted_dataset, task), self.options.similarity_examples, self.device)
                source = most_similar_task(self.body(), earlier, x, y)
                xi.copy_(earlier[source])
                self.copied_from[task] = source
        if xi is not None:
            self.initial_programs[task] = xi.detach().clone()

    # ------------------------------------------------------------------ EWC
    def _ewc_names(self) -> list[str]:
        return [n for n, _ in self.body().named_parameters() if self.options.scope == "shared" or n.startswith("bank.")]

    def criterion(self):
        loss = super().criterion()
        if self.is_training and self.mode == "ewc" and self.anchors and self.options.ewc_lambda > 0 and self.options.step == "gradient":
            params = dict(self.body().named_parameters())
            names = self._ewc_names()
            loss = loss + ewc_penalty({n: params[n] for n in names}, self.anchors, self.fishers, self.options.ewc_lambda)
        return loss

    def optimizer_step(self):
        super().optimizer_step()
        if self.mode == "ewc" and self.anchors and self.options.ewc_lambda > 0 and self.options.step == "proximal":
            params = dict(self.body().named_parameters())
            with torch.no_grad():
                for n in self._ewc_names():
                    p = params[n]
                    step = proximal_step_size(self.optimizer, p)
                    p.copy_(ewc_proximal(p, [a[n] for a in self.anchors], [f[n] for f in self.fishers], self.options.ewc_lambda, step))

    def _after_training_exp(self, **kwargs):
        tasks = list(getattr(self.experience, "task_labels", [0]))
        self._recalibrate(tasks)
        if self.mode == "ewc":
            for t in tasks:
                anchor, fisher = self.shared_fisher(t)
                self.anchors.append(anchor)
                self.fishers.append(fisher)
        self._log_programs(len(self.model.tasks))
        super()._after_training_exp(**kwargs)

    def shared_fisher(self, task: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ*_t and the diagonal true Fisher of the EWC parameters, on up to ``fisher_max_examples`` of task t's
        training examples (the network in eval mode: the task's running statistics)."""
        x, _ = _sample(_task_data(self.adapted_dataset, task), self.options.fisher_max_examples, self.device)
        body, net = self.body(), self.model
        names = self._ewc_names()
        params = dict(body.named_parameters())
        mixture, norms, head = net.mixture(task).detach(), net.norms[str(task)], net.heads[str(task)]
        was_training = net.training
        net.eval()

        def log_prob(weights, xi):
            feats = functional_call(body, weights, (xi.unsqueeze(0), mixture, norms), strict=False)
            return F.log_softmax(head(feats)[0], dim=-1)

        with torch.no_grad():  # the head is captured by the closure: keep the Fisher out of the autograd graph
            sums, count = fisher_sum(log_prob, {n: params[n] for n in names}, [x], mode=self.options.fisher, chunk=32)
        net.train(was_training)
        return {n: params[n].detach().clone() for n in names}, {n: (s / count).detach() for n, s in sums.items()}

    # ------------------------------------------------------------------ record hooks
    def record_extras(self) -> dict:
        return {"mode": self.mode, "copied_from": self.copied_from or None, **self.program_extras()}


class TemplateJointTraining(_TaskProgramViews, JointTraining):
    """Multi-task training of every task's program, statistics and head and the shared body at once
    (Avalanche's task-balanced batches: each step sees every task)."""

    def __init__(self, *, model: nn.Module, options: ProgramOptions, train: TrainConfig, evaluator=None, device="cpu",
                 plugins: Sequence = ()):  # fmt: skip
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
        return {"mode": "joint", **self.program_extras()}


# --------------------------------------------------------------------------- ITA / IEL on programs


@dataclasses.dataclass
class _TemplateVectorFields:
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


class TemplateVectorStrategy(_ProgramBookkeeping, TaskVectorStrategy):
    """ITA/IEL (:class:`~strategies.ita.TaskVectorStrategy`) on a :class:`ProgramNet` with task vectors on ξ.

    The first experience first trains the whole network (body, ξ0, statistics, its head) like every other
    template strategy; that network is θ0: its statistics are frozen and its parameters stay fixed, and the
    task vectors τ_t (one per experience, the first included) move only the mixture logits.
    Evaluation is task-agnostic: ξ0 + (1/T) Σ τ_t for every input and all heads concatenated. The task-aware
    accuracy of the same composed model (argmax within the experience's own classes) is recorded too.
    """

    def __init__(self, *, model: nn.Module, options, train: TrainConfig, method: Literal["ita", "iel"], alpha=0.0, beta=0.0,
                 evaluator=None, device="cpu", plugins: Sequence = ()):  # fmt: skip
        backbone = getattr(model, "backbone", model)
        if not isinstance(backbone, ProgramNet):
            raise ConfigError("template-ita/template-iel need the template-mixture backbone (--backbone template-mixture)")
        if backbone.xi is None:
            raise ConfigError("template-ita/template-iel need a program to tune: backbone.sharing must be 'templates'")
        composition = "composed" if method == "iel" else "individual"
        net = ComposableNet(backbone, backbone.out_features, options.tuning, options.rank, ["xi"], composition)
        self._init_bookkeeping(options, train)
        self.options = options
        self.pretrained = False
        self.initial_base: torch.Tensor | None = None
        self.task_aware_rows: list[list[float]] = []
        self._aware_counts: dict[int, list[int]] = {}
        super().__init__(model=net, options=options, train=train, method=method, alpha=alpha, beta=beta,
                         evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip

    # ------------------------------------------------------------------ views
    def body(self) -> TemplateMixtureNet:
        return self.model.backbone.body

    def base_logits(self) -> torch.Tensor:
        return self.model.backbone.xi.detach()

    def current_programs(self) -> dict[int, torch.Tensor]:
        """ξ0 + τ_t per experience (the task's own program; inference uses the composition)."""
        base = self.base_logits()
        return {t: (base + self.pool.deltas(t)["xi"].detach()).clone() for t in range(self.pool.num_tasks)}

    def composed_logits(self) -> torch.Tensor:
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
        return {"params_per_task": float(sum(per_task) / t) if t else None, "statistics_per_task": 0.0,
                "shared_params": float(sum(p.numel() for p in self.body().parameters()) + self.base_logits().numel())}  # fmt: skip

    # ------------------------------------------------------------------ the first experience: θ0
    def _prepare_experience(self) -> None:
        if not self.pretrained:
            self._train_base_network()
        super()._prepare_experience()
        t = self.task
        # the programs' learning rate, as in the other template strategies (the head keeps train.lr)
        head = list(self.model.heads.heads[t].parameters())
        self.optimizer = optimizer_for([(head, 1.0), (self.pool.task_parameters(t), self.options.program_lr_scale)], self.train_config)
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
            recalibrate_statistics(backbone.norms, backbone, _inputs(self.adapted_dataset, self.train_config.eval_batch_size, self.device))
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
            x, y = _sample(data, self.options.similarity_examples, self.device)
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
        extras = TaskVectorStrategy.record_extras(self)
        own = self.program_extras()
        diagnostics = extras.pop("diagnostics") or []
        for row in own.pop("diagnostics"):  # one row per experience: merge ITA's with the programs'
            match = next((d for d in diagnostics if d.get("tasks") == row["tasks"]), None)
            if match is not None:
                match.update(row)
            else:
                diagnostics.append(row)
        return extras | own | {"diagnostics": diagnostics, "task_aware_accuracy_matrix": self.task_aware_rows,
                               "initial_base_program": self.initial_base.tolist() if self.initial_base is not None else None}  # fmt: skip


# --------------------------------------------------------------------------- registration


def _task_aware(mode):
    def build(model, options, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
        return TemplateStrategy(model=model, options=options, train=train, mode=mode, evaluator=evaluator, device=device,
                                plugins=plugins)  # fmt: skip

    return build


for _name, _mode, _opts, _doc in [
    ("template-finetune", "finetune", ProgramOptions, "Template network: body, ξ_t and head train on every experience (lower bound)."),
    ("template-program", "program", ProgramOptions, "Template network: after the first experience only ξ_t and the head train (no forgetting)."),
    ("template-ewc", "ewc", TemplateEWCOptions, "Template network fine-tuned with EWC on the shared template bank / body."),
]:
    _factory = _task_aware(_mode)
    _factory.__doc__ = _doc
    STRATEGIES.register(_name, _opts)(_factory)


@STRATEGIES.register("template-joint", ProgramOptions)
def template_joint(model, options: ProgramOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Template network trained on all tasks at once, task-balanced batches (multi-task upper bound)."""
    return TemplateJointTraining(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)


@STRATEGIES.register("template-ita", TemplateITAOptions)
def template_ita(model, options: TemplateITAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """ITA with task vectors on the programs ξ of a template network; task-agnostic composed inference."""
    return TemplateVectorStrategy(model=model, options=options, train=train, method="ita", alpha=options.alpha,
                                  evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip


@STRATEGIES.register("template-iel", TemplateIELOptions)
def template_iel(model, options: TemplateIELOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """IEL with task vectors on the programs ξ of a template network; task-agnostic composed inference."""
    return TemplateVectorStrategy(model=model, options=options, train=train, method="iel", beta=options.beta,
                                  evaluator=evaluator, device=device, plugins=plugins)  # fmt: skip
