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
import os
import socket
import time
from pathlib import Path
from typing import Any

from clcompose.bench.io import read_json
from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.record import current_job_id

RECORD, RUNNING, FAILED, JOB, LOCK = "record.json", "running.json", "failed.json", "job.json", ".lock"
STATES = ("done", "running", "failed", "missing")


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
    run_dir = Path(run_dir)
    record = run_dir / RECORD
    if record.exists():
        rec = read_json(record)
        if rec is None or "metrics" not in rec:
            return CellState("failed", f"{record} is unreadable (truncated?)")
        return CellState("done", f"final accuracy {rec['metrics'].get('final_average_accuracy', float('nan')):.4f}")
    progress = checkpoint.peek(run_dir / checkpoint.CHECKPOINT_NAME)
    done_steps = f"{progress['next_step']}/{progress['n_steps']} experiences done" if progress else ""
    running = read_json(run_dir / RUNNING)
    if running is not None and is_alive(running) is not False:
        where = f"pid {running.get('pid')} on {running.get('host')}" + (
            f", job {running['job_id']}" if running.get("job_id") else ""
        )
        step = running.get("step")
        return CellState(
            "running", ", ".join(filter(None, [f"experience {step[0]}/{step[1]} done" if step else "", where]))
        )
    job = read_json(run_dir / JOB)
    if job is not None and queued and job.get("job_id") in queued:
        return CellState(
            "running",
            f"job {job['job_id']} {queued[job['job_id']].lower()}" + (f", {done_steps}" if done_steps else ""),
        )
    failed = read_json(run_dir / FAILED)
    if failed is not None:
        return CellState("failed", f"{failed.get('error', 'error')}" + (f" ({done_steps})" if done_steps else ""))
    if running is not None:  # its process is gone without a record or an error: killed
        return CellState(
            "failed",
            f"interrupted: pid {running.get('pid')} on {running.get('host')} died"
            + (f" ({done_steps}; re-run to resume)" if done_steps else ""),
        )
    return CellState("missing", f"checkpoint: {done_steps}; re-run to resume" if done_steps else "")


def squeue_states() -> dict[str, str]:
    """``{job id: state}`` of this user's queued and running SLURM jobs (array tasks one by one); {} without SLURM."""
    import shutil
    import subprocess

    if shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-u", str(os.getuid()), "-o", "%i %T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split(None, 1)) == 2)
