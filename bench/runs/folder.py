"""A run folder's housekeeping, shared by ``bench run`` and the sweep worker (:mod:`clcompose.bench.sweeps.store`).

- :class:`CellLock`: an exclusive ``flock`` on ``.lock`` that one process holds while it runs the cell, so two
  processes (two sweeps, a sweep and a ``bench run``, two ``bench run``) never train the same cell at once;
- :func:`record_problem`: whether a record file is a complete record (a truncated or hand-edited one is not);
- :func:`move_aside_damaged`: a damaged record is renamed ``record.json.corrupt-<UTC time>`` (kept for a human,
  never deleted) so that the cell runs again;
- :func:`clean_stale_temporaries`: temporary files (``.checkpoint.pt.<pid>.tmp``, ...) that a writer killed
  mid-write left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from clcompose.bench.io import move_aside

LOCK = ".lock"
RUNNING, FAILED = "running.json", "failed.json"


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def whoami() -> dict[str, Any]:
    """This process as ``running.json`` names its holder: host, pid (+ its start time) and scheduler job."""
    from clcompose.bench.runs.record import current_job_id

    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid), "job_id": current_job_id()}


def is_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the process in ``holder`` still runs: True/False on this host, None (unknown) elsewhere."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    return isinstance(pid, int) and _process_start(pid) is not None and _process_start(pid) == holder.get("pid_start")


class CellLock:
    """An exclusive, non-blocking flock on ``<run folder>/.lock`` (``.<record name>.lock`` for a record that is
    not ``record.json``); released when the holder exits or dies, whatever killed it."""

    def __init__(self, run_dir: Path, name: str = LOCK):
        self.path = Path(run_dir) / name
        self._fd: int | None = None

    @classmethod
    def for_record(cls, record_path: Path) -> CellLock:
        record_path = Path(record_path)
        name = LOCK if record_path.name == "record.json" else f".{record_path.name}.lock"
        return cls(record_path.parent, name)

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


def record_problem(path: Path) -> str | None:
    """None when ``path`` holds a complete result record, else what is wrong with it (the file must exist)."""
    from clcompose.bench.runs.record import SCHEMA_VERSION

    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        detail = f": {exc.msg} at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        return f"not valid JSON (truncated or corrupted?){detail}"
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        return f"not a result record of schema {SCHEMA_VERSION}"
    if data.get("status") != "complete" or not isinstance(data.get("metrics"), dict):
        return "not a complete result record (no metrics or status not 'complete')"
    return None


def is_complete_record(path: Path) -> bool:
    return Path(path).is_file() and record_problem(path) is None


def move_aside_damaged(record_path: Path) -> tuple[Path, str] | None:
    """Rename a damaged record out of the way (call it holding the cell's lock); returns (new path, problem)."""
    record_path = Path(record_path)
    if not record_path.exists():
        return None
    problem = record_problem(record_path)
    if problem is None:
        return None
    return move_aside(record_path, "corrupt"), problem


def state_file_names(record_path: Path) -> set[str]:
    """The files the holder of a cell writes next to its record (their temporaries are ``.<name>.<pid>.tmp``)."""
    from clcompose.bench.runs.checkpoint import CHECKPOINT_NAME

    record_path = Path(record_path)
    stem = "" if record_path.name == "record.json" else f"{record_path.stem}."
    checkpoint = f"{stem}{CHECKPOINT_NAME}"
    return {record_path.name, checkpoint, str(Path(checkpoint).with_suffix(".json")), RUNNING, FAILED}


def clean_stale_temporaries(record_path: Path) -> list[Path]:
    """Delete the temporary files that earlier holders of the cell left when they were killed mid-write.

    Call it holding the cell's lock: every other writer of these files held the lock before and is gone, so
    their temporaries are stale, whatever process now has their pid. Returns the files removed.
    """
    record_path = Path(record_path)
    names = state_file_names(record_path)
    removed = []
    for tmp in record_path.parent.glob(".*.tmp"):
        name, _, pid = tmp.name[1 : -len(".tmp")].rpartition(".")
        if name in names and pid.isdigit() and int(pid) != os.getpid():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
