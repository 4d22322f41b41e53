"""The result store: one folder per run, named from the run's content hash.

A run folder holds, over its life::

    .lock            flock held by the process running the cell (one writer at a time, even across sweeps)
    running.json     who runs it (host, pid, job) and how far it got
    checkpoint.pt    the state after the last finished experience (+ checkpoint.json, its summary)
    job.json         the scheduler job the cell was submitted in (slurm)
    failed.json      the error of the last failed attempt (type, message, traceback)
    record.json      the result (JSON; written once, atomically, never overwritten)

Cell states, as ``bench status`` shows them: **done** (record written), **running** (a live process holds the
cell, or its scheduler job is queued), **failed** (the last attempt raised or was killed), **missing** (not run
yet, possibly with a checkpoint to resume from).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

RECORD, RUNNING, FAILED, JOB, LOCK = "record.json", "running.json", "failed.json", "job.json", ".lock"
STATES = ("done", "running", "failed", "missing")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    from bench.record import write_json_atomic

    write_json_atomic(path, payload, overwrite=True)


def current_job_id() -> str | None:
    """The submitit job id of this process (``12_3`` for an array task), or None outside a job."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job
        return None


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def whoami() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "job_id": current_job_id()}


def is_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the process in ``holder`` still runs: True/False on this host, None (unknown) elsewhere."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    return isinstance(pid, int) and _process_start(pid) is not None and _process_start(pid) == holder.get("pid_start")


class CellLock:
    """An exclusive, non-blocking flock on ``<run folder>/.lock``; released when the holder exits or dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.5)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@dataclasses.dataclass
class CellState:
    state: str  # one of STATES
    detail: str = ""


def cell_state(run_dir: Path, queued: dict[str, str] | None = None) -> CellState:
    """Classify a run folder; ``queued`` maps scheduler job ids to their state (from squeue), when known."""
    from bench import checkpoint

    run_dir = Path(run_dir)
    record = run_dir / RECORD
    if record.exists():
        rec = _read_json(record)
        if rec is None or "metrics" not in rec:
            return CellState("failed", f"{record} is unreadable (truncated?)")
        return CellState("done", f"final accuracy {rec['metrics'].get('final_average_accuracy', float('nan')):.4f}")
    progress = checkpoint.peek(run_dir / checkpoint.CHECKPOINT_NAME)
    done_steps = f"{progress['next_step']}/{progress['n_steps']} experiences done" if progress else ""
    running = _read_json(run_dir / RUNNING)
    if running is not None and is_alive(running) is not False:
        where = f"pid {running.get('pid')} on {running.get('host')}" + (f", job {running['job_id']}" if running.get("job_id") else "")
        step = running.get("step")
        return CellState("running", ", ".join(filter(None, [f"experience {step[0]}/{step[1]} done" if step else "", where])))
    job = _read_json(run_dir / JOB)
    if job is not None and queued and job.get("job_id") in queued:
        return CellState("running", f"job {job['job_id']} {queued[job['job_id']].lower()}" + (f", {done_steps}" if done_steps else ""))
    failed = _read_json(run_dir / FAILED)
    if failed is not None:
        return CellState("failed", f"{failed.get('error', 'error')}" + (f" ({done_steps})" if done_steps else ""))
    if running is not None:  # its process is gone without a record or an error: killed
        return CellState("failed", f"interrupted: pid {running.get('pid')} on {running.get('host')} died" + (f" ({done_steps}; re-run to resume)" if done_steps else ""))
    return CellState("missing", f"checkpoint: {done_steps}; re-run to resume" if done_steps else "")


def squeue_states() -> dict[str, str]:
    """``{job id: state}`` of this user's queued and running SLURM jobs (array tasks one by one); {} without SLURM."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", str(os.getuid()), "-o", "%i %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split(None, 1)) == 2)


def _reset_peak_memory() -> None:
    """Let ``peak_memory_mb`` describe this run, not an earlier run of the same worker (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def run_cell(config: dict[str, Any], expected_hash: str, run_dir: Path, progress: bool = False,
             same_job_wait_s: float = 300.0) -> dict[str, Any]:  # fmt: skip
    """Run one cell in its folder unless it is done or busy; returns an outcome ``{"status": ..., ...}``.

    Statuses: ``done`` (ran now), ``skipped`` (a record exists), ``busy`` (another live process holds the cell),
    ``duplicate`` (another writer wrote the record while this one ran; its record is kept), ``failed``.
    Exceptions are recorded in ``failed.json`` and returned, except the ones that end the job itself
    (submitit's requeue on USR2, SystemExit, KeyboardInterrupt), which propagate.
    """
    from bench import checkpoint
    from bench.record import RecordExistsError, write_json_atomic
    from bench.run import RunConfig, config_hash, execute

    run_dir = Path(run_dir)
    record_path = run_dir / RECORD
    if record_path.exists():
        return {"status": "skipped", "run_dir": str(run_dir)}
    me = whoami()
    lock = CellLock(run_dir)
    if not lock.acquire():
        holder = _read_json(run_dir / RUNNING) or {}
        # A requeued job can start while its previous incarnation is still exiting: wait for that one.
        if not (me["job_id"] and holder.get("job_id") == me["job_id"] and lock.acquire(wait_s=same_job_wait_s)):
            return {"status": "busy", "run_dir": str(run_dir), "holder": holder}
    try:
        if record_path.exists():
            return {"status": "skipped", "run_dir": str(run_dir)}
        started = time.time()
        (run_dir / FAILED).unlink(missing_ok=True)  # a new attempt: the last one's error no longer describes the cell
        state = me | {"started": started, "step": None}
        _write_json(run_dir / RUNNING, state)

        def on_step(done: int, total: int) -> None:
            _write_json(run_dir / RUNNING, state | {"step": [done, total], "updated": time.time()})

        try:
            resolved = RunConfig.from_dict(config).resolve()
            if config_hash(resolved.to_dict()) != expected_hash:
                from strategies.registry import ConfigError

                raise ConfigError("the config resolves to another hash than at submission (was the code updated?); submit the sweep again")
            _reset_peak_memory()
            record = execute(resolved, progress=progress, artifacts_dir=run_dir,
                             checkpoint_path=run_dir / checkpoint.CHECKPOINT_NAME, on_step=on_step)  # fmt: skip
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if type(exc).__name__ == "UncompletedJobError":  # submitit ends the job (e.g. timed out too often)
                raise
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
            _write_json(run_dir / FAILED, me | {"error": error, "traceback": traceback.format_exc(), "at": time.time()})
            return {"status": "failed", "run_dir": str(run_dir), "error": error}
        try:
            write_json_atomic(record_path, record)
        except RecordExistsError:
            checkpoint.remove(run_dir / checkpoint.CHECKPOINT_NAME)
            return {"status": "duplicate", "run_dir": str(run_dir)}
        checkpoint.remove(run_dir / checkpoint.CHECKPOINT_NAME)
        return {"status": "done", "run_dir": str(run_dir), "wall_s": round(time.time() - started, 2),
                "final_average_accuracy": record["metrics"]["final_average_accuracy"]}  # fmt: skip
    finally:
        (run_dir / RUNNING).unlink(missing_ok=True)
        lock.release()
