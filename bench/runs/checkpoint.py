"""Experience-boundary checkpoints of a run, so that a killed or preempted run resumes bit for bit.

A checkpoint holds the whole strategy object (model, optimizer, plugin state such as EWC's importances or
LwF's previous model, the evaluator), the state of every global random generator (Avalanche's
``RNGManager``: ``random``, NumPy, torch, CUDA) and the loop's own progress (accuracy rows so far, timings).
It follows Avalanche's ``save_checkpoint``/``maybe_load_checkpoint`` (dill through ``torch.save``), with two
differences: the file is written atomically (temporary file, then rename), and classes are pickled by
reference, because dill cannot pickle ``torch.optim`` classes by value (``torch.optim`` hides its submodules).

Checkpoints are private pickles that live in the run folder until the record is written; results are JSON.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

from clcompose.bench.io import write_json_atomic

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
# Per-call attributes that Avalanche rebuilds at every train()/eval(); never worth storing.
TRANSIENT_ATTRIBUTES = (
    "experience",
    "adapted_dataset",
    "dataloader",
    "mbatch",
    "mb_output",
    "loss",
    "current_eval_stream",
    "_eval_streams",
)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not belong to this run."""


@contextlib.contextmanager
def _dill_by_reference():
    import dill

    old = dill.settings["byref"]
    dill.settings["byref"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dill.PicklingWarning)  # "Cannot locate reference to SGD": found on load
            yield dill
    finally:
        dill.settings["byref"] = old


def save(path: Path, strategy: Any, loop: dict[str, Any], summary: dict[str, Any] | None = None) -> Path:
    """Write ``strategy`` (minus its per-call attributes), the global RNG states and ``loop`` to ``path``.

    ``summary`` (small, JSON) goes to a sidecar ``<path stem>.json`` that :func:`peek` reads without unpickling.
    """
    import avalanche.checkpointing  # noqa: F401  (registers dill reducers for torch.device and datasets)
    import torch
    from avalanche.training.determinism.rng_manager import RNGManager

    path = Path(path)
    clone = copy.copy(strategy)
    for name in TRANSIENT_ATTRIBUTES:
        if hasattr(clone, name):
            setattr(clone, name, None)
    if isinstance(getattr(clone, "plugins", None), list):  # progress bars and the like: this attempt's own
        clone.plugins = [p for p in clone.plugins if not getattr(p, "transient", False)]
    payload = {"format": FORMAT, "strategy": clone, "rng_manager": RNGManager, "loop": loop}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    evaluator = getattr(strategy, "evaluator", None)
    loggers = getattr(evaluator, "loggers", None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if loggers:  # open files, writers and W&B runs are not state: a resumed run builds its own loggers
            evaluator.loggers = []
        with _dill_by_reference() as dill:
            torch.save(payload, tmp, pickle_module=dill)
        os.replace(tmp, path)
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    finally:
        if loggers:
            evaluator.loggers = loggers
    if summary is not None:
        write_json_atomic(_sidecar(path), summary, overwrite=True)
    return path


def load(path: Path, strategy: Any, device: str = "cpu") -> dict[str, Any]:
    """Restore ``strategy`` in place and the global RNG states from ``path``; return the loop state.

    ``strategy`` must be freshly built from the same config: its attributes are replaced by the stored ones
    (as in Avalanche's ``maybe_load_checkpoint``), so ``strategy.model`` is a new object afterwards.
    """
    import avalanche.checkpointing  # noqa: F401
    import torch

    try:
        with (
            _dill_by_reference() as dill,
            contextlib.redirect_stdout(io.StringIO()),
        ):  # Avalanche prints "Mapping cpu to cpu"
            payload = torch.load(path, pickle_module=dill, map_location=map_location(device), weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a run checkpoint of format {FORMAT}")
    loggers = getattr(getattr(strategy, "evaluator", None), "loggers", None)
    strategy.__dict__.update(payload["strategy"].__dict__)  # RNG states were restored while unpickling
    if loggers and getattr(strategy, "evaluator", None) is not None:
        strategy.evaluator.loggers = loggers  # this attempt's loggers (checkpoints hold none)
    return payload["loop"]


def strategy_state(path: Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """The strategy state stored in ``path`` (its attributes) and the loop state, for a mid-experience resume."""
    import avalanche.checkpointing  # noqa: F401
    import torch

    with _dill_by_reference() as dill, contextlib.redirect_stdout(io.StringIO()):
        payload = torch.load(path, pickle_module=dill, map_location=map_location(device), weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a run checkpoint of format {FORMAT}")
    return dict(payload["strategy"].__dict__), payload["loop"]


def map_location(device: str):
    """Where ``torch.load`` puts a checkpoint's storages on a run on ``device``: those saved on the CPU stay there
    (the RNG states, which torch only accepts on the CPU, and state kept on the CPU on purpose, such as the
    per-class feature statistics sampled with a CPU generator); those saved on an accelerator go to ``device``
    (a run checkpointed on one node's cuda:1 resumes on another's cuda:0). Mapping everything to the device made
    every resume on a GPU fail to restore the RNG states and start the run again from scratch."""
    if device == "cpu":
        return "cpu"

    def place(storage, location: str):
        import torch

        return storage if location == "cpu" else torch.serialization.default_restore_location(storage, device)

    return place


def _sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def peek(path: Path) -> dict[str, Any] | None:
    """The summary written next to a checkpoint (e.g. progress for ``bench status``), if there is one."""
    import json

    if not Path(path).exists():
        return None
    try:
        return json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return None


def previous_attempts(path: Path, config_hash: str) -> list[dict[str, Any]]:
    """The attempts at this run logged in the summary next to ``path`` (also by attempts killed before their
    first checkpoint); [] when there is none or it belongs to another config."""
    import json

    try:
        summary = json.loads(_sidecar(path).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(summary, dict) or summary.get("config_hash") != config_hash:
        return []
    attempts = summary.get("attempts")
    if not isinstance(attempts, list):
        return []
    return [a for a in attempts if isinstance(a, dict)]


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write the summary next to ``path`` (e.g. at the start of an attempt, before any checkpoint exists)."""
    write_json_atomic(_sidecar(path), summary, overwrite=True)


def remove(path: Path) -> None:
    """Delete a checkpoint and its summary (once the record is safely written)."""
    Path(path).unlink(missing_ok=True)
    _sidecar(path).unlink(missing_ok=True)
    Path(path).with_name(f"{Path(path).stem}-inside{Path(path).suffix}").unlink(missing_ok=True)  # inside.Saver's
