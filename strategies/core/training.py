"""Training settings shared by every strategy, and the optimizer they build."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import torch

from clcompose.strategies.core.registry import Options


@dataclasses.dataclass
class TrainConfig(Options):
    """Optimisation settings common to all strategies (per experience)."""

    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0

    def check(self) -> None:
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def template_kwargs(
    model: torch.nn.Module,
    train: TrainConfig,
    evaluator,
    device,
    plugins,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """The keyword arguments every suite strategy passes to Avalanche's ``SupervisedTemplate``."""
    return dict(
        model=model,
        optimizer=optimizer if optimizer is not None else make_optimizer(model.parameters(), train),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=train.batch_size,
        train_epochs=train.epochs,
        eval_mb_size=train.eval_batch_size,
        device=device,
        plugins=list(plugins or []),
        evaluator=evaluator,
        eval_every=-1,
    )
