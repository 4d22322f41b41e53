"""The result store: one folder per run, named from the run's content hash.

A run folder holds, over its life::

    .lock            flock held by the process running the cell (one writer at a time, even across sweeps)
    running.json     who runs it (host, pid, job) and how far it got
    checkpoint.pt    the state after the last finished experience (+ checkpoint.json, its summary)
    job.json         the scheduler job the cell was submitted in (slurm)
    failed.json      the error of the last failed attempt (type, message, traceback)
    record.json      the result (JSON; written once, atomically, never overwritten)
    record.json.corrupt-<UTC time>   a damaged record, moved aside by the run that ran the cell again
    logs/            the loggers of ``train.loggers``, if any

Cell states, as ``bench status`` shows them: **done** (complete record written), **running** (a live process
holds the cell, or its scheduler job is queued), **failed** (the last attempt raised or was killed, or the
record is damaged: the next run moves it aside), **missing** (not run yet, possibly with a checkpoint to resume
from). The lock and the folder's housekeeping live in :mod:`clcompose.bench.runs.folder`, shared with ``bench run``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from clcompose.bench.io import read_json
from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.folder import LOCK, CellLock, is_alive, record_problem, whoami

RECORD, RUNNING, FAILED, JOB = "record.json", "running.json", "failed.json", "job.json"
STATES = ("done", "running", "failed", "missing")
__all__ = ["LOCK", "CellLock", "CellState", "cell_state", "is_alive", "squeue_states", "whoami"]


@dataclasses.dataclass
class CellState:
    state: str  # one of STATES
    detail: str = ""


def cell_state(run_dir: Path, queued: dict[str, str] | None = None) -> CellState:
    """Classify a run folder; ``queued`` maps scheduler job ids to their state (from squeue), when known."""
    run_dir = Path(run_dir)
    record = run_dir / RECORD
    # The holder is read before the record: a worker writes its record before it removes its RUNNING file, so in
    # this order a cell that finishes while we look reads as running or done, never as interrupted.
    running = read_json(run_dir / RUNNING)
    holder_alive = running is not None and is_alive(running) is not False
    if record.exists():
        problem = record_problem(record)
        if problem is not None:  # the next run moves it aside (record.json.corrupt-<time>) and runs the cell again
            return CellState("failed", f"{RECORD} is {problem}; a re-run moves it aside and runs the cell again")
        rec = read_json(record) or {}
        accuracy = rec["metrics"].get("final_average_accuracy")
        return CellState("done", f"final accuracy {accuracy:.4f}" if isinstance(accuracy, (int, float)) else "")
    progress = checkpoint.peek(run_dir / checkpoint.CHECKPOINT_NAME) or {}
    done_steps = f"{progress['next_step']}/{progress['n_steps']} experiences done" if "n_steps" in progress else ""
    if holder_alive:
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
