"""One seeded run: a benchmark stream, a backbone, a strategy → one result record (JSON)."""

from __future__ import annotations

import resource
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clcompose.bench.runs.config import ResolvedRun, RunConfig, config_hash
from clcompose.bench.runs.session import _evaluator, _Session, accuracy_row, seed_everything  # noqa: F401
from clcompose.strategies.core.protocols import ExtraMetrics, FinalMetrics, RecordsExtras, SavesArtifacts, StepMetrics
from clcompose.strategies.core.registry import ConfigError


def execute(
    resolved: ResolvedRun,
    progress: bool = True,
    artifacts_dir: Path | None = None,
    checkpoint_path: Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Train the stream and return the record (not yet written).

    Strategies may expose ``record_extras() -> dict`` (stored under ``strategy_extras``),
    ``save_artifacts(folder) -> list[str]`` (e.g. task vectors; called when ``artifacts_dir`` is given) and
    ``final_metrics(benchmark) -> dict`` (scalar metrics computed after the stream, e.g. transfer to a task the
    benchmark held out; merged into the record's ``metrics``; must not change what later steps would see).
    Benchmarks may expose ``extra_metrics(strategy) -> dict`` (scalar metrics of the trained strategy, e.g. on
    probe streams; merged into the record's ``metrics``), ``step_metrics(strategy, trained) -> dict`` (scalars
    after every training step, ``trained`` being the experience indices trained so far, e.g. accuracy on a probe
    stream as training proceeds; the record's ``step_metrics``, computed with the RNG state restored afterwards
    so that they do not change the run) and ``info['input_dim']`` (given to a backbone whose ``in_features``
    option is null).

    With ``checkpoint_path``, the complete training state is saved there after every experience (see
    :mod:`bench.checkpoint`), and a checkpoint already there (of the same config) is resumed: the record of a
    resumed run has the same accuracy matrix and metrics as an uninterrupted one, plus ``resumes``: one entry
    per attempt after the first, logged when the attempt starts (so also attempts killed before their next
    checkpoint). ``on_step(done, total)`` is called after each training step (e.g. to report progress).
    ``log_dir`` is where the loggers of ``train.loggers`` write (none without it).
    """
    import torch

    cfg = resolved.config
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available here")
    wall0, cpu0 = time.perf_counter(), time.process_time()

    digest = config_hash(resolved.to_dict())
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    attempts = _start_attempt(ckpt, digest) if ckpt is not None else []  # logged before anything is built
    session = _Session.build(resolved, progress, log_dir, attempt=max(len(attempts), 1))
    try:
        loop = _new_loop(resolved, len(session.steps))
        if ckpt is not None and ckpt.exists():
            loop = _resume(ckpt, session, resolved) or loop
        if ckpt is not None:
            attempts = _settle_attempt(ckpt, attempts, loop)
        record = _train(
            session, resolved, loop, (wall0, cpu0), progress, checkpoint_path, on_step, attempts, artifacts_dir
        )
    finally:
        session.close()
    if resolved.loggers and log_dir is not None:
        folder = Path(log_dir)
        shown = folder.name if artifacts_dir is not None and folder.parent == Path(artifacts_dir) else str(folder)
        record["loggers"] = {"loggers": list(resolved.loggers), "folder": shown}
    return record


def _start_attempt(path: Path, digest: str) -> list[dict[str, Any]]:
    """Log this attempt next to the checkpoint before anything is built (so that an attempt killed while
    setting up counts too); returns every attempt so far, this one last."""
    from clcompose.bench.io import utc_now
    from clcompose.bench.runs import checkpoint

    summary = checkpoint.peek(path) or {}  # the checkpoint's summary, if there is a checkpoint
    if summary and summary.get("config_hash") != digest:
        return []  # another config's checkpoint: resuming it is refused below; leave its summary alone
    attempt = {"from_step": summary.get("next_step", 0), "at": utc_now(), "host": socket.gethostname()}
    attempts = checkpoint.previous_attempts(path, digest) + [attempt]
    _write_summary(path, summary | {"config_hash": digest, "attempts": attempts})
    return attempts


def _settle_attempt(path: Path, attempts: list[dict[str, Any]], loop: dict[str, Any]) -> list[dict[str, Any]]:
    """Correct this attempt's entry once it is known where it starts (an unreadable checkpoint starts at 0; a
    checkpoint of an older version carries its earlier attempts in the loop state)."""
    attempts = [dict(a) for a in attempts] or [{"at": None, "host": None}]
    changed = attempts[-1].get("from_step") != loop["next_step"]
    attempts[-1]["from_step"] = loop["next_step"]
    if len(attempts) == 1 and loop["next_step"] > 0:
        attempts = [{"from_step": 0, "at": None, "host": None}] + list(loop.get("resumes") or []) + attempts
        changed = True
    if changed:
        summary = {"config_hash": loop["config_hash"], "next_step": loop["next_step"], "n_steps": loop["n_steps"]}
        _write_summary(path, summary | {"attempts": attempts})
    return attempts


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    from clcompose.bench.runs import checkpoint

    try:
        checkpoint.write_summary(path, summary)
    except OSError as exc:  # the run itself can go on; only the count of attempts may then fall short
        print(f"bench: warning: could not log the attempt next to {path}: {exc.strerror}", file=sys.stderr)


def _train(session, resolved, loop, started, progress, checkpoint_path, on_step, attempts, artifacts_dir) -> dict:
    """The training loop of :func:`execute` from ``loop['next_step']`` on; returns the record."""
    import torch
    from tqdm.auto import tqdm

    cfg = resolved.config
    wall0, cpu0 = started
    setup_wall = time.perf_counter() - wall0
    earlier_wall, earlier_cpu = loop["wall_s"], loop["cpu_s"]  # spent by earlier attempts up to their checkpoint

    n_steps, n_exp = len(session.steps), session.n_experiences
    bar = tqdm(
        total=n_steps,
        initial=loop["next_step"],
        desc=f"{cfg.strategy} on {cfg.benchmark}",
        unit="exp",
        disable=not progress,
        leave=False,
    )
    from clcompose.bench.runs import inside

    saver = inside.Saver(checkpoint_path, session, loop["config_hash"])
    for i in range(loop["next_step"], n_steps):
        experiences = session.steps[i]
        session.seen(i)
        t, c = time.perf_counter(), time.process_time()
        resume = saver.resume(i, cfg.device)
        counts = inside.run_step(
            session.strategy,
            experiences,
            resolved.train,
            cfg.device,
            progress=progress,
            description=f"experience {i + 1}/{n_steps}",
            every_min=resolved.checkpoint_every_min if checkpoint_path is not None else None,
            save=saver.for_step(i),
            resume=resume,
        )
        train_wall, train_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        eval_kwargs = inside.loader_kwargs(resolved.train, cfg.device) if hasattr(session.strategy, "plugins") else {}
        row = accuracy_row(session.strategy.eval(session.test_stream, **eval_kwargs), n_exp)
        loop["matrix"].append(row)
        if isinstance(session.benchmark, StepMetrics):
            with torch.random.fork_rng(devices=[]):
                trained = [e.current_experience for step in session.steps[: i + 1] for e in step]
                loop.setdefault("step_metrics", []).append(
                    {"step": i} | session.benchmark.step_metrics(session.strategy, trained)
                )
        loop["timings"].append(
            {
                "step": i,
                "experiences": [e.current_experience for e in experiences],
                "train_wall_s": round(train_wall, 4),
                "train_cpu_s": round(train_cpu, 4),
                "eval_wall_s": round(time.perf_counter() - t, 4),
            }
            | inside.throughput(counts, resume)
        )
        loop["next_step"] = i + 1
        loop["wall_s"] = earlier_wall + time.perf_counter() - wall0
        loop["cpu_s"] = earlier_cpu + time.process_time() - cpu0
        if checkpoint_path is not None:
            checkpoint_path = _save_checkpoint(Path(checkpoint_path), session, loop, attempts)
        saver.done()
        bar.update()
        bar.set_postfix(acc=f"{sum(row[: i + 1]) / (i + 1):.3f}")
        if on_step is not None:
            on_step(i + 1, n_steps)
    bar.close()
    artifacts = []
    if artifacts_dir is not None and isinstance(session.strategy, SavesArtifacts):
        artifacts = session.strategy.save_artifacts(Path(artifacts_dir))
    timing = {
        "setup_wall_s": round(setup_wall, 4),
        "steps": loop["timings"],
        "total_wall_s": round(earlier_wall + time.perf_counter() - wall0, 4),
        "total_cpu_s": round(earlier_cpu + time.process_time() - cpu0, 4),
    }
    record = _record(resolved, session, loop, timing, artifacts)
    if len(attempts) > 1:
        record["resumes"] = [{k: a.get(k) for k in ("from_step", "at", "host")} for a in attempts[1:]]
    return record


def _new_loop(resolved: ResolvedRun, n_steps: int) -> dict[str, Any]:
    return {
        "config_hash": config_hash(resolved.to_dict()),
        "n_steps": n_steps,
        "next_step": 0,
        "matrix": [],
        "timings": [],
        "wall_s": 0.0,
        "cpu_s": 0.0,
        "resumes": [],
    }


def _resume(path: Path, session: _Session, resolved: ResolvedRun) -> dict[str, Any] | None:
    """Load the checkpoint into ``session``; None (start afresh, with a warning) when it cannot be read."""
    from clcompose.bench.runs import checkpoint

    try:
        loop = checkpoint.load(path, session.strategy, resolved.config.device)
    except checkpoint.CheckpointError as exc:
        print(f"bench: warning: {exc}; starting the run from the beginning", file=sys.stderr)
        # unpickling may have moved the RNGs: rebuild from the seeds, with this attempt's loggers
        evaluator = getattr(session.strategy, "evaluator", None) if session.loggers else None
        fresh = _Session._build(resolved, False, evaluator or _evaluator(), session.loggers)
        session.__dict__.update(fresh.__dict__)
        return None
    if loop.get("config_hash") != config_hash(resolved.to_dict()) or loop.get("n_steps") != len(session.steps):
        raise ConfigError(f"checkpoint {path} belongs to another run config; delete it to start this run afresh")
    return loop


def _save_checkpoint(path: Path, session: _Session, loop: dict[str, Any], attempts: list) -> Path | None:
    """Checkpoint after a step; on failure warn once and go on without checkpoints (returns None)."""
    from clcompose.bench.runs import checkpoint

    summary = {
        "config_hash": loop["config_hash"],
        "next_step": loop["next_step"],
        "n_steps": loop["n_steps"],
        "attempts": attempts,
    }
    try:
        checkpoint.save(path, session.strategy, loop, summary)
        return path
    except checkpoint.CheckpointError as exc:
        print(f"bench: warning: {exc}; this run continues without checkpoints", file=sys.stderr)
        checkpoint.remove(path)
        return None


def _record(
    resolved: ResolvedRun, session: _Session, loop: dict[str, Any], timing: dict, artifacts: list
) -> dict[str, Any]:
    import torch

    from clcompose.bench.io import utc_now
    from clcompose.bench.runs.record import SCHEMA_VERSION, environment
    from clcompose.strategies.metrics import continual as M

    cfg, matrix, n_exp = resolved.config, loop["matrix"], session.n_experiences
    if len(matrix) == n_exp:
        metrics = M.summarize(matrix)
    else:  # joint training: one step over the whole stream, so only final accuracies exist
        metrics = {
            "final_average_accuracy": float(sum(matrix[-1]) / n_exp),
            "forgetting": None,
            "bwt": None,
            "accuracy_curve": None,
        }
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": resolved.run_id(),
        "status": "complete",
        "created": utc_now(),
        "config": resolved.to_dict(),
        "config_hash": config_hash(resolved.to_dict()),
        "seeds": {"seed": cfg.seed, "stream_seed": cfg.stream_seed},
        "stream": session.benchmark.info | {"n_experiences": n_exp},
        "accuracy_matrix": matrix,
        "metrics": metrics,
        "timing": timing,
        "peak_memory_mb": round(peak_kb / 1024, 1),
        "peak_cuda_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "environment": environment(),
    }
    if isinstance(session.benchmark, ExtraMetrics):
        record["metrics"] = metrics | session.benchmark.extra_metrics(session.strategy)
    if isinstance(session.strategy, FinalMetrics):
        record["metrics"] = record["metrics"] | session.strategy.final_metrics(session.benchmark)
    if isinstance(session.strategy, RecordsExtras):
        record["strategy_extras"] = session.strategy.record_extras()
    if artifacts:
        record["artifacts"] = artifacts
    if loop.get("step_metrics"):
        record["step_metrics"] = loop["step_metrics"]
    return record


def default_record_path(resolved: ResolvedRun, runs_dir: str | Path = "runs") -> Path:
    return Path(runs_dir) / resolved.run_id() / "record.json"


def checkpoint_path_for(record_path: str | Path) -> Path:
    """Where the run that writes ``record_path`` keeps its checkpoint: ``checkpoint.pt`` in a run folder."""
    from clcompose.bench.runs.checkpoint import CHECKPOINT_NAME

    record_path = Path(record_path)
    if record_path.name == "record.json":
        return record_path.with_name(CHECKPOINT_NAME)
    return record_path.with_name(f"{record_path.stem}.{CHECKPOINT_NAME}")


def log_dir_for(record_path: str | Path) -> Path:
    """Where the loggers of the run that writes ``record_path`` write: ``logs/`` in a run folder."""
    record_path = Path(record_path)
    return record_path.with_name("logs" if record_path.name == "record.json" else f"{record_path.stem}.logs")


class CellBusyError(ConfigError):
    """Another live process holds the run's lock (it is training the same cell right now)."""


def run(
    config: RunConfig | dict, out: str | Path | None = None, runs_dir: str | Path = "runs", progress: bool = True
) -> tuple[Path, dict]:
    """Validate, refuse an existing output path, train, and write the record atomically (never overwriting).

    ``out`` is a record path, or a folder (ending in ``/`` or existing) that gets ``record.json``; by default
    the record goes to the shared store, ``RUNS_DIR/<run id>/record.json``. The run holds the same per-cell
    lock as a sweep's worker, so of two identical runs at once the second stops at once (:class:`CellBusyError`,
    one line, exit 2) and leaves nothing behind. In the store, a record that is not complete (truncated,
    corrupted) is moved aside (``record.json.corrupt-<UTC time>``) and the cell runs again; an explicit ``out``
    that exists is never touched. The run checkpoints next to the record after every experience and resumes
    from such a checkpoint when one is there (an earlier, interrupted attempt); the checkpoint is deleted once
    the record is written, and temporary files that killed writers left are cleaned up.
    """
    from clcompose.bench.io import RecordExistsError, check_folder_path, record_path_from

    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    resolved = cfg.resolve()
    in_store = out is None
    if in_store:
        check_folder_path(runs_dir, "runs folder")
        path = default_record_path(resolved, runs_dir)
    else:
        path = record_path_from(out)
    if path.exists() and not (in_store and _damaged(path)):
        raise RecordExistsError(f"{path} already exists; records are never overwritten (choose another --out)")
    return path, _run_locked(resolved, path, in_store, progress)


def _damaged(path: Path) -> bool:
    from clcompose.bench.runs.folder import record_problem

    return record_problem(path) is not None


def _run_locked(resolved: ResolvedRun, path: Path, in_store: bool, progress: bool) -> dict:
    from clcompose.bench.io import RecordExistsError, read_json, write_json_atomic
    from clcompose.bench.runs import checkpoint
    from clcompose.bench.runs.folder import (
        FAILED,
        RUNNING,
        CellLock,
        clean_stale_temporaries,
        move_aside_damaged,
        whoami,
    )

    lock = CellLock.for_record(path)
    try:
        acquired = lock.acquire()
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {path.parent}: {exc.strerror}") from None
    in_run_folder = path.name == "record.json"
    if not acquired:
        holder = read_json(path.parent / RUNNING) or {}
        who = f" by pid {holder.get('pid')} on {holder.get('host')}" if holder else ""
        raise CellBusyError(
            f"{path.parent} is being run{who} right now; nothing was done (wait for its record, or choose another --out)"
        )
    try:
        if path.exists():  # looked at again under the lock
            moved = move_aside_damaged(path) if in_store else None
            if moved is None:
                raise RecordExistsError(f"{path} already exists; records are never overwritten (choose another --out)")
            print(
                f"bench: warning: {path} was {moved[1]}; moved it aside to {moved[0].name} and running the cell again",
                file=sys.stderr,
            )
        clean_stale_temporaries(path)
        if in_run_folder:
            (path.parent / FAILED).unlink(missing_ok=True)
            write_json_atomic(path.parent / RUNNING, whoami() | {"started": time.time(), "step": None}, overwrite=True)
        ckpt = checkpoint_path_for(path)
        record = execute(
            resolved, progress=progress, artifacts_dir=path.parent, checkpoint_path=ckpt, log_dir=log_dir_for(path)
        )
        write_json_atomic(path, record)
        checkpoint.remove(ckpt)
        clean_stale_temporaries(path)
        return record
    finally:
        if in_run_folder:
            (path.parent / RUNNING).unlink(missing_ok=True)
        lock.release()
