"""Inside one experience: progress (iterations, loss, ETA), throughput, and checkpoints every N minutes.

An hour-long ViT experience must survive preemption. :class:`InsideExperience` is a duck-typed Avalanche
plugin that the run loop appends to the strategy for one training step. Every ``every_min`` minutes (0: at
every mini-batch), at a mini-batch where no gradient is pending (``at_step_boundary``: the end of a virtual
batch), it calls ``save(inside)`` with where training stands: the epoch, the mini-batches done in it, the
global RNG states at the start of the experience and of the epoch. A resumed run (:func:`resume_inside`)
restores the RNGs of the experience start and calls ``train`` again; once Avalanche has rebuilt the
experience's data loader, the checkpointed strategy state replaces the live one, and the interrupted epoch
starts from the epoch-start RNGs (the same shuffling and worker seeds), loads and drops the mini-batches
already trained (:class:`SkipFirst`), restores the RNGs of the checkpoint and goes on. The resumed run's
metrics are bit-identical to an uninterrupted one's (tested on CPU).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# attributes of a strategy that belong to the running train() call; a mid-experience restore keeps the live ones
LIVE_ATTRIBUTES = ("experience", "adapted_dataset", "dataloader", "mbatch", "mb_output", "loss", "_eval_streams")


def rng_state() -> dict[str, Any]:
    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class SkipFirst:
    """A data loader that loads and drops its first ``start`` mini-batches, then restores ``rng_after``."""

    def __init__(self, loader, start: int, rng_after: dict[str, Any]):
        self.loader, self.start, self.rng_after = loader, start, rng_after

    def __iter__(self):
        it = iter(self.loader)
        for _ in range(self.start):
            next(it)
        set_rng_state(self.rng_after)
        yield from it

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["loader"], name)


class InsideExperience:
    """Progress bar, throughput counter and mid-experience checkpoints of one training step (see the module)."""

    supports_distributed = False
    transient = True  # left out of checkpoints (checkpoint.save)

    def __init__(
        self,
        save: Callable[[dict[str, Any]], None] | None = None,
        every_min: float | None = None,
        progress: bool = False,
        description: str = "",
        resume: dict[str, Any] | None = None,
    ):
        self.save, self.every_min, self.progress, self.description = save, every_min, progress, description
        self.resume = resume  # the checkpointed position and the strategy state to restore into the live call
        self.images, self.seconds, self.bar = 0, 0.0, None
        self._last_save = time.monotonic()
        self._epoch, self._done, self._epoch_rng, self._exp_rng = 0, 0, None, rng_state()
        self._tick = None

    # ------------------------------------------------------------------ Avalanche callbacks
    def before_training_epoch(self, strategy, **kwargs):
        if self.resume is not None:
            return self._restore(strategy)
        self._epoch_rng, self._done = rng_state(), 0
        self._open_bar(strategy, 0)

    def before_training_iteration(self, strategy, **kwargs):
        self._tick = time.perf_counter()

    def after_training_iteration(self, strategy, **kwargs):
        if self._tick is not None:
            self.seconds += time.perf_counter() - self._tick
        self.images += len(strategy.mb_y)
        self._done += 1
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(loss=f"{float(strategy.loss):.4f}", refresh=False)
        due = self.every_min is not None and (time.monotonic() - self._last_save) >= 60 * self.every_min
        if self.save is not None and due and getattr(strategy, "at_step_boundary", True):
            self.save(
                {
                    "epoch": self._epoch,
                    "done": self._done,
                    "epoch_rng": self._epoch_rng,
                    "experience_rng": self._exp_rng,
                    "rng": rng_state(),
                }
            )
            self._last_save = time.monotonic()

    def after_training_epoch(self, strategy, **kwargs):
        if isinstance(strategy.dataloader, SkipFirst):  # the resumed epoch is over: later epochs load everything
            strategy.dataloader = strategy.dataloader.loader
        self._epoch += 1
        self.close()

    # ------------------------------------------------------------------ helpers
    def _open_bar(self, strategy, initial: int) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        self.close()
        total = len(strategy.dataloader)
        desc = f"{self.description} epoch {self._epoch + 1}/{strategy.train_epochs}"
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", leave=False)

    def _restore(self, strategy) -> None:
        """Replace the live strategy state by the checkpointed one and skip to the checkpointed mini-batch."""
        where, state = self.resume["inside"], self.resume["state"]
        self.resume = None
        live = {k: strategy.__dict__[k] for k in LIVE_ATTRIBUTES if k in strategy.__dict__}
        plugins = [p for p in strategy.plugins if isinstance(p, InsideExperience)]
        strategy.__dict__.update({k: v for k, v in state.items() if k not in LIVE_ATTRIBUTES})
        strategy.__dict__.update(live)
        strategy.plugins = [p for p in strategy.plugins if not isinstance(p, InsideExperience)] + plugins
        self._epoch, self._done, self._epoch_rng = where["epoch"], where["done"], where["epoch_rng"]
        self._exp_rng = where["experience_rng"]
        set_rng_state(where["epoch_rng"])
        strategy.dataloader = SkipFirst(strategy.dataloader, where["done"], where["rng"])
        self._open_bar(strategy, where["done"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __getstate__(self):  # never pickled with the strategy (the run loop removes it), but be safe
        return self.__dict__ | {"bar": None, "save": None, "resume": None}


def train_resumed(strategy, experiences, inside: dict[str, Any], **kwargs) -> None:
    """Train the interrupted step again from its mid-experience checkpoint (see the module docstring).

    The epochs before the checkpointed one are not trained again: Avalanche's epoch loop is replaced, for this
    call, by one that starts at the checkpointed epoch (whose ``before_training_epoch`` callbacks already ran).
    """
    set_rng_state(inside["experience_rng"])
    start_epoch = inside["epoch"]

    def _train_exp(experience, eval_streams=None, **kw):
        plugin = next(p for p in strategy.plugins if isinstance(p, InsideExperience))
        plugin.before_training_epoch(strategy)  # restores the state: strategy.train_epochs is the stored one
        first = True
        for _ in range(start_epoch, strategy.train_epochs):
            if not first:
                strategy._before_training_epoch(**kw)
                if strategy._stop_training:
                    strategy._stop_training = False
                    break
            first = False
            strategy.training_epoch(**kw)
            strategy._after_training_epoch(**kw)

    strategy._train_exp = _train_exp
    try:
        strategy.train(experiences, eval_streams=[], **kwargs)
    finally:
        strategy.__dict__.pop("_train_exp", None)


def loader_kwargs(train, device: str) -> dict[str, Any]:
    """DataLoader settings of ``train`` (workers, and pinned memory on CUDA) for Avalanche's train/eval."""
    return {"num_workers": train.workers, "pin_memory": device.startswith("cuda"), "persistent_workers": False}


def run_step(
    strategy,
    experiences,
    train,
    device: str,
    *,
    progress: bool,
    description: str,
    every_min: float | None,
    save,
    resume: dict[str, Any] | None,
) -> dict[str, float]:
    """Train one step with :class:`InsideExperience` attached; returns the images trained and their seconds."""
    if not hasattr(strategy, "plugins"):  # not an Avalanche template (the meta-learners): nothing inside to see
        strategy.train(experiences, eval_streams=[])
        return {}
    plugin = InsideExperience(save, every_min, progress, description, resume)
    strategy.plugins.append(plugin)
    try:
        if resume is not None:
            train_resumed(strategy, experiences, resume["inside"], **loader_kwargs(train, device))
        else:
            strategy.train(experiences, eval_streams=[], **loader_kwargs(train, device))
    finally:
        plugin.close()
        strategy.plugins = [p for p in strategy.plugins if not isinstance(p, InsideExperience)]
    return {"train_images": plugin.images, "train_iteration_s": round(plugin.seconds, 4)}


def throughput(counts: dict[str, float], resume) -> dict[str, Any]:
    """Images trained in the step and training images per second (of the training iterations; of this attempt)."""
    if not counts:
        return {}
    rate = counts["train_images"] / counts["train_iteration_s"] if counts["train_iteration_s"] > 0 else None
    out = counts | {"images_per_s": round(rate, 2) if rate is not None else None}
    return out | ({"resumed_inside": True} if resume is not None else {})


class Saver:
    """Mid-experience checkpoints of the run loop, in a file of their own next to the run's checkpoint (which
    keeps the state at the start of the experience: the resumed attempt redoes the experience's set-up from it,
    exactly, before the mid-experience state replaces the live one). ``resume(step)`` hands a resumed step the
    checkpointed position and strategy state; ``done(step)`` drops the file once the step is checkpointed."""

    def __init__(self, path, session, config_hash: str):
        self.path = inside_path(path) if path is not None else None
        self.session, self.config_hash = session, config_hash

    def resume(self, step: int, device: str) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        from clcompose.bench.runs import checkpoint

        try:
            state, loop = checkpoint.strategy_state(self.path, device)
        except Exception as exc:  # a damaged file: this step starts from its beginning
            print(f"bench: warning: ignoring {self.path.name} ({type(exc).__name__}); the step starts afresh")
            return None
        where = loop.get("inside") or {}
        if loop.get("config_hash") != self.config_hash or where.get("step") != step:
            return None
        return {"inside": where, "state": state}

    def for_step(self, step: int):
        if self.path is None:
            return None

        def save(where: dict[str, Any]) -> None:
            from clcompose.bench.runs import checkpoint

            if self.path is None:
                return
            loop = {"config_hash": self.config_hash, "inside": where | {"step": step}}
            try:
                checkpoint.save(self.path, self.session.strategy, loop)
            except checkpoint.CheckpointError as exc:
                print(f"bench: warning: {exc}; no more checkpoints inside experiences", file=sys.stderr)
                self.path = None

        return save

    def done(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def inside_path(checkpoint_path) -> Path:
    """Where the mid-experience checkpoint of the run checkpointing to ``checkpoint_path`` lives."""
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(f"{checkpoint_path.stem}-inside{checkpoint_path.suffix}")
