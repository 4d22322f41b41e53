"""Running one cell of a sweep in its run folder: the lock, the state files, the record (see :mod:`.store`)."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from clcompose.bench.io import RecordExistsError, read_json, write_json_atomic
from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.config import RunConfig, config_hash
from clcompose.bench.runs.folder import clean_stale_temporaries, is_complete_record, move_aside_damaged
from clcompose.bench.runs.run import execute, log_dir_for
from clcompose.bench.sweeps.store import FAILED, RECORD, RUNNING, CellLock, whoami
from clcompose.strategies.core.registry import ConfigError


def _write_state(path: Path, payload: dict[str, Any]) -> None:
    write_json_atomic(path, payload, overwrite=True)


def _reset_peak_memory() -> None:
    """Let ``peak_memory_mb`` describe this run, not an earlier run of the same worker (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_cell(
    config: dict[str, Any], expected_hash: str, run_dir: Path, progress: bool = False, same_job_wait_s: float = 300.0
) -> dict[str, Any]:
    """Run one cell in its folder unless it is done or busy; returns an outcome ``{"status": ..., ...}``.

    Statuses: ``done`` (ran now), ``skipped`` (a record exists), ``busy`` (another live process holds the cell),
    ``duplicate`` (another writer wrote the record while this one ran; its record is kept), ``failed``.
    A record that is not complete (truncated, corrupted) is moved aside to ``record.json.corrupt-<UTC time>``
    and the cell runs again (the outcome names it under ``moved_aside``). Exceptions, including a record that
    cannot be written, are recorded in ``failed.json`` and returned, except the ones that end the job itself
    (submitit's requeue on USR2, SystemExit, KeyboardInterrupt), which propagate.
    """
    run_dir = Path(run_dir)
    record_path = run_dir / RECORD
    if is_complete_record(record_path):
        return {"status": "skipped", "run_dir": str(run_dir)}
    me = whoami()
    lock = CellLock(run_dir)
    try:
        acquired = lock.acquire()
    except OSError as exc:
        return _failed(run_dir, f"cannot write the run folder: {exc.strerror} ({exc.filename})")
    if not acquired:
        holder = read_json(run_dir / RUNNING) or {}
        # A requeued job can start while its previous incarnation is still exiting: wait for that one.
        if not (me["job_id"] and holder.get("job_id") == me["job_id"] and lock.acquire(wait_s=same_job_wait_s)):
            return {"status": "busy", "run_dir": str(run_dir), "holder": holder}
    try:
        return _run_held(config, expected_hash, run_dir, me, progress)
    finally:
        try:
            (run_dir / RUNNING).unlink(missing_ok=True)
        except OSError:
            pass
        lock.release()


def _failed(run_dir: Path, error: str, **extra: Any) -> dict[str, Any]:
    return {"status": "failed", "run_dir": str(run_dir), "error": error} | extra


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _run_held(config: dict[str, Any], expected_hash: str, run_dir: Path, me: dict, progress: bool) -> dict[str, Any]:
    """:func:`run_cell` once this process holds the cell's lock."""
    record_path = run_dir / RECORD
    moved = None
    started = time.time()
    try:
        if record_path.exists():  # looked at again under the lock
            moved = move_aside_damaged(record_path)
            if moved is None:
                return {"status": "skipped", "run_dir": str(run_dir)}
        clean_stale_temporaries(record_path)
        (run_dir / FAILED).unlink(missing_ok=True)  # a new attempt: the last one's error no longer describes the cell
        state = me | {"started": started, "step": None}
        _write_state(run_dir / RUNNING, state)

        def on_step(done: int, total: int) -> None:
            _write_state(run_dir / RUNNING, state | {"step": [done, total], "updated": time.time()})

        resolved = RunConfig.from_dict(config).resolve()
        if config_hash(resolved.to_dict()) != expected_hash:
            raise ConfigError(
                "the config resolves to another hash than at submission (was the code updated?); submit the sweep again"
            )
        _reset_peak_memory()
        record = execute(
            resolved,
            progress=progress,
            artifacts_dir=run_dir,
            checkpoint_path=run_dir / checkpoint.CHECKPOINT_NAME,
            on_step=on_step,
            log_dir=log_dir_for(record_path),
        )
        write_json_atomic(record_path, record)  # inside: a record that cannot be written fails this cell only
    except RecordExistsError:
        checkpoint.remove(run_dir / checkpoint.CHECKPOINT_NAME)
        return {"status": "duplicate", "run_dir": str(run_dir)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if type(exc).__name__ == "UncompletedJobError":  # submitit ends the job (e.g. timed out too often)
            raise
        error = _error_line(exc)
        try:
            _write_state(
                run_dir / FAILED, me | {"error": error, "traceback": traceback.format_exc(), "at": time.time()}
            )
        except OSError:  # an unwritable folder: the outcome still carries the error
            pass
        return _failed(run_dir, error, **_moved(moved))
    checkpoint.remove(run_dir / checkpoint.CHECKPOINT_NAME)
    clean_stale_temporaries(record_path)
    return {
        "status": "done",
        "run_dir": str(run_dir),
        "wall_s": round(time.time() - started, 2),
        "final_average_accuracy": record["metrics"]["final_average_accuracy"],
    } | _moved(moved)


def _moved(moved: tuple[Path, str] | None) -> dict[str, str]:
    return {"moved_aside": str(moved[0]), "problem": moved[1]} if moved else {}
