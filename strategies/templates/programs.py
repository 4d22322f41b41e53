"""Pieces every template strategy uses: the optimiser over parameter groups, the choice of the most similar
earlier program (``program_init=copy``), the summaries of a set of programs, and small dataset helpers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.metrics import templates as TM
from clcompose.strategies.templates.network import TemplateMixtureNet, mixture_of


def optimizer_for(groups: Sequence[tuple[list[nn.Parameter], float]], train: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over parameter groups (params, lr multiplier)."""
    param_groups = [{"params": ps, "lr": train.lr * scale} for ps, scale in groups if ps]
    if train.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=train.lr, weight_decay=train.weight_decay)


# --------------------------------------------------------------------------- the most similar earlier program


def nearest_mean_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the nearest-class-mean classifier fitted and scored on (features, labels)."""
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    pred = classes[torch.cdist(features, means).argmin(1)]
    return float((pred == labels).float().mean())


@torch.no_grad()
def most_similar_task(
    body: TemplateMixtureNet, programs: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> int:
    """The earlier task whose program gives the best nearest-class-mean accuracy on (x, y); statistics are
    the batch's own (fresh statistics in training mode, discarded afterwards). Ties go to the earliest task."""
    best, best_acc = None, -1.0
    for task, logits in programs.items():
        norms = body.new_norms().train()
        acc = nearest_mean_accuracy(body(x, mixture_of(logits), norms), y)
        if acc > best_acc:
            best, best_acc = task, acc
    return best


def sample_examples(dataset, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a dataset in a random order drawn from the global generator."""
    idx = torch.randperm(len(dataset))[:n].tolist()
    items = [dataset[i] for i in idx]
    return torch.stack([it[0] for it in items]).to(device), torch.tensor([int(it[1]) for it in items], device=device)


# --------------------------------------------------------------------------- summaries of a set of programs


def program_summary(
    programs: dict[int, torch.Tensor], initial: dict[int, torch.Tensor], names: dict[int, str] | None = None
) -> dict:
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


def mean_of_rows(rows: list[list[float]]) -> float | None:
    """Mean over every entry of a list of rows (None when there are none)."""
    values = [v for r in rows for v in r]
    return float(sum(values) / len(values)) if values else None


def summary_metrics(summary: dict) -> dict[str, float | None]:
    """Scalars of a :func:`program_summary` for the record's metrics."""
    return {
        "mixture_entropy_init": mean_of_rows(summary["entropy_init"]),
        "mixture_entropy_final": mean_of_rows(summary["entropy_final"]),
        "template_overlap": TM.mean_offdiagonal(summary["program_overlap"]),
        "template_usage_overlap": TM.mean_offdiagonal(summary["usage_overlap"]),
        "template_usage_jsd": TM.mean_offdiagonal(summary["usage_jsd"]),
    }


# --------------------------------------------------------------------------- datasets


def dataset_inputs(dataset, batch_size: int, device):
    """The inputs of a dataset in its own order (for recalibrating statistics)."""
    return (x.to(device) for x, *_ in DataLoader(dataset, batch_size=batch_size))


def task_data(dataset, task: int):
    """Task ``task``'s part of an Avalanche dataset (the dataset itself when it has no task labels)."""
    return dataset.task_set[task] if hasattr(dataset, "task_set") else dataset


def experience_tasks(experience) -> list[int]:
    """The task labels of an experience (0 for a stream without task labels)."""
    return list(getattr(experience, "task_labels", [0]))
