"""Training settings shared by every strategy, the optimizer they build, and gradient accumulation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

import torch

from clcompose.strategies.core.registry import ConfigError, Options


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
    # gradient accumulation: one optimiser step per `virtual_batch` mini-batches, each loss divided by it
    # (ita, iel, task-arithmetic only). None: 1, or 16 under their `strategy.preset=reference`
    virtual_batch: int | None = None
    # the reference's first step of an epoch accumulates virtual_batch + 1 mini-batches (see VirtualBatchEpoch).
    # None: true under `strategy.preset=reference`, false otherwise
    virtual_batch_quirk: bool | None = None
    # autocast of the training forward: bf16, or fp16 with a GradScaler (a step with inf/NaN gradients is skipped)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    workers: int = 0  # DataLoader worker processes (memory is pinned on CUDA); they draw the augmentation

    def check(self) -> None:
        self.require(self.epochs >= 1, "epochs", "must be >= 1")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        self.require(self.lr > 0, "lr", "must be > 0")
        self.require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.virtual_batch is None or self.virtual_batch >= 1, "virtual_batch", "must be >= 1")
        self.require(self.workers >= 0, "workers", "must be >= 0")


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
    accumulates: bool = False,
) -> dict:
    """The keyword arguments every suite strategy passes to Avalanche's ``SupervisedTemplate``.

    ``accumulates``: the strategy implements ``train.virtual_batch`` (:class:`VirtualBatchEpoch`); any other
    strategy refuses a virtual batch above 1 rather than ignoring it.
    """
    if not accumulates and (train.virtual_batch or 1) > 1:
        raise ConfigError(
            "train.virtual_batch > 1 (gradient accumulation) is implemented by ita, iel and task-arithmetic"
        )
    if train.precision != "fp32":
        plugins = [*list(plugins or []), MixedPrecision(train.precision)]
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


def is_step_iteration(i: int, virtual_batch: int, quirk: bool) -> bool:
    """Whether mini-batch ``i`` (0-based, counted within the epoch) ends a virtual batch.

    quirk (the reference code: ``(i > 0 or V == 1) and i % V == 0``): steps after mini-batches V, 2V, …, so the
    first step of an epoch accumulates V + 1 mini-batches and an epoch of at most V mini-batches never steps.
    Otherwise steps after mini-batches V − 1, 2V − 1, … (V each). Either way the mini-batches after an epoch's
    last step are dropped: their gradients are cleared when the next epoch starts.
    """
    if virtual_batch == 1:
        return True
    return (i > 0 and i % virtual_batch == 0) if quirk else (i + 1) % virtual_batch == 0


class VirtualBatchEpoch:
    """Mixin for an Avalanche ``SupervisedTemplate``: gradient accumulation over ``virtual_batch`` mini-batches.

    Each mini-batch's loss is divided by V and back-propagated; ``optimizer_step`` (the optimiser and anything
    the strategy does with it, e.g. a decoupled regulariser step) runs once per virtual batch
    (:func:`is_step_iteration`), and the gradients are cleared after each step and at the start of every epoch.
    With V = 1 the epoch is Avalanche's own. ``optimizer_steps`` counts the steps of the current experience.
    """

    virtual_batch: int = 1
    virtual_batch_quirk: bool = False
    optimizer_steps: int = 0
    at_step_boundary: bool = True  # no gradient is pending (a checkpoint taken now holds the whole state)

    def training_epoch(self, **kwargs):
        # a resumed epoch's loader skips the mini-batches already trained and says how many (`start`)
        start = getattr(self.dataloader, "start", 0)
        if self.virtual_batch == 1:
            n = len(self.dataloader)  # a resumed epoch's earlier steps were not counted yet: added here with the rest
            super().training_epoch(**kwargs)
            self.optimizer_steps += n
            return
        v = self.virtual_batch
        for i, mbatch in enumerate(self.dataloader, start=start):
            self.mbatch = mbatch
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            if i == 0:
                self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            self.loss += self.criterion() / v
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self.at_step_boundary = is_step_iteration(i, v, self.virtual_batch_quirk)
            if self.at_step_boundary:
                self._before_update(**kwargs)
                self.optimizer_step()
                self._after_update(**kwargs)
                self.optimizer.zero_grad()
                self.optimizer_steps += 1
            self._after_training_iteration(**kwargs)
        self.at_step_boundary = True


class MixedPrecision:
    """Avalanche plugin (duck-typed): the training forward under ``torch.autocast`` (bf16 or fp16).

    fp16 scales the loss by a ``torch.amp.GradScaler`` before backward; before the update the gradients are
    unscaled, and a step whose gradients hold inf/NaN is skipped (the optimiser's ``step`` is a no-op for it),
    after which the scale is updated — what ``GradScaler.step`` does, spread over Avalanche's callbacks so that
    strategies that step in their own ``optimizer_step`` keep working. The loss itself is computed in fp32.
    """

    supports_distributed = False

    def __init__(self, precision: str):
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        self.scaler = None
        self._context = None

    def _device_type(self, strategy) -> str:
        return torch.device(strategy.device).type

    def before_training_exp(self, strategy, **kwargs):
        if self.dtype == torch.float16 and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self._device_type(strategy))

    def before_forward(self, strategy, **kwargs):
        self._context = torch.autocast(self._device_type(strategy), dtype=self.dtype)
        self._context.__enter__()

    def after_forward(self, strategy, **kwargs):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        if isinstance(strategy.mb_output, torch.Tensor) and strategy.mb_output.is_floating_point():
            strategy.mb_output = strategy.mb_output.float()  # the loss in fp32

    def before_backward(self, strategy, **kwargs):
        if self.scaler is not None:
            strategy.loss = self.scaler.scale(strategy.loss)

    def before_update(self, strategy, **kwargs):
        if self.scaler is None:
            return
        self.scaler.unscale_(strategy.optimizer)
        found = sum(v.item() for v in self.scaler._found_inf_per_device(strategy.optimizer).values())
        if found:
            strategy.optimizer.step = lambda *a, **k: None  # this step is skipped, as GradScaler.step would

    def after_update(self, strategy, **kwargs):
        if self.scaler is None:
            return
        strategy.optimizer.__dict__.pop("step", None)
        self.scaler.update()

    def __getstate__(self):
        return self.__dict__ | {"_context": None}
