"""Shared I/O of the harness (a leaf: it imports nothing else of ``clcompose.bench``).

Atomic JSON writing, lenient and strict JSON/YAML reading, UTC time stamps, and where the suite's files live:
the source checkout (when running from one) and the package data (cluster profiles, example sweeps) that an
installed wheel carries.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from clcompose.strategies.core.registry import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parent  # bench/ in a checkout, site-packages/clcompose/bench in a wheel


def _source_checkout() -> Path | None:
    root = _PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "strategies").is_dir() else None


REPO_ROOT: Path | None = _source_checkout()
"""The repository the code runs from, or None for an installed wheel."""

_RESOURCES = {"profiles": ("slurm/profiles", "profiles"), "examples": ("examples", "examples")}


def resource_dir(kind: str) -> Path:
    """The folder of the cluster profiles (``profiles``) or example sweeps (``examples``): the checkout's
    ``slurm/profiles``/``examples`` folders, or the copies inside an installed wheel (``clcompose/profiles``)."""
    in_checkout, in_wheel = _RESOURCES[kind]
    if REPO_ROOT is not None:
        return REPO_ROOT / in_checkout
    return _PACKAGE_DIR.parent / in_wheel


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository (or else the working directory) when it lies inside it; pages and
    tables that are committed then show paths that hold on every clone."""
    p = Path(path).absolute()
    for base in (REPO_ROOT, Path.cwd()):
        if base is None:
            continue
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


class RecordExistsError(ConfigError):
    """The output path already holds a file; records are never overwritten."""


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
                raise RecordExistsError(
                    f"{path} already exists; records are never overwritten (choose another --out)"
                ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable, malformed or not an object
    (for the store's small state files, which may be caught half-written by a killed process)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping; one-line errors for every way it can be wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError(
            f"{what} file {path} is not valid YAML{where}" + (f": {problem}" if problem else "")
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not a text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping, got {type(data).__name__}")
    return data
