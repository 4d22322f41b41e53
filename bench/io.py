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


def cache_dir() -> Path:
    """Root of the suite's caches (``$BENCH_CACHE`` or ``~/.cache/clcompose``): pre-trained backbones, the
    ``bench list`` description."""
    return Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "clcompose")).expanduser()


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


class NonFiniteError(ConfigError):
    """A payload holds NaN or infinity, which strict JSON (and so a record) cannot hold."""


def non_finite_path(payload: Any, prefix: str = "") -> str | None:
    """The first key path (``metrics.bwt``, ``accuracy_matrix[2][0]``) of a NaN or infinite float in ``payload``."""
    import math

    if isinstance(payload, float):
        return None if math.isfinite(payload) else (prefix or "(top level)")
    if isinstance(payload, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in payload.items())
    elif isinstance(payload, (list, tuple)):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(payload))
    else:
        return None
    for where, value in items:
        found = non_finite_path(value, where)
        if found:
            return found
    return None


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, payload: Any, *, overwrite: bool = False) -> Path:
    """Write ``payload`` as JSON so that readers see either nothing or the whole file.

    The text goes to a temporary file in the same folder, is fsynced, then linked into place. With
    ``overwrite=False`` the link fails if ``path`` exists (no-clobber, atomic even between processes).
    """
    path = Path(path)
    try:
        text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except ValueError:
        where = non_finite_path(payload)
        if where is None:
            raise
        raise NonFiniteError(
            f"{path} was not written: it would hold a non-finite number (NaN or infinity) at {where}; JSON has none"
        ) from None
    if overwrite:
        return write_text_atomic(path, text)

    def link(tmp: Path, target: Path) -> None:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise RecordExistsError(
                f"{target} already exists; records are never overwritten (choose another --out)"
            ) from None

    return write_text_atomic(path, text, place=link)


def write_text_atomic(path: Path, text: str, place: Any = None) -> Path:
    """Replace ``path`` by ``text`` so that readers see the old file or the new one, never a part of either
    (a temporary file in the same folder, fsynced, then renamed over it). For tables, pages and the like;
    ``place(tmp, path)`` puts the written file in place (``os.replace``; records link it, never clobbering)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        (place or os.replace)(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_csv_atomic(path: Path, frame: Any) -> Path:
    """A pandas DataFrame as CSV (no index), written with :func:`write_text_atomic`."""
    return write_text_atomic(path, frame.to_csv(index=False))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable, malformed or not an object
    (for the store's small state files, which may be caught half-written by a killed process)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _strict_loader():
    """A ``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # keys merged in with << may be overridden on purpose
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base class reports it
                        break
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None,
                            None,
                            f"duplicate key {key!r} (first at line {first.line + 1})",
                            key_node.start_mark,
                        )
                    seen[key] = key_node.start_mark
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def load_yaml(text: str) -> Any:
    """Parse YAML text like ``yaml.safe_load``, but a duplicated key in a mapping is an error."""
    import yaml

    return yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)


def yaml_error_line(exc: Exception) -> str:
    """A ``yaml.YAMLError`` as `` at line N: problem`` (for one-line messages)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    return where + (f": {problem}" if problem else "")


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping; one-line errors for every way it can be wrong (including a
    key given twice, which plain YAML would resolve by silently dropping the first)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} file {path} is not valid YAML{yaml_error_line(exc)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not a text file") from None
    except OSError as exc:
        raise ConfigError(f"{what} file {path} cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping, got {type(data).__name__}")
    return data


def check_folder_path(path: str | Path, what: str) -> Path:
    """``path`` where a folder goes: refused (one line) when it, or the nearest of its parents that exists, is
    not a folder — which ``mkdir`` would otherwise report as a traceback."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is an existing file, not a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
            break
    return path


def record_path_from(out: str | Path, name: str = "record.json") -> Path:
    """Where ``--out OUT`` writes: ``OUT/<name>`` when OUT names a folder (ends with ``/`` or is an existing
    folder), else OUT itself, whose folder must be creatable."""
    text = str(out)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        return check_folder_path(path, "output folder") / name
    check_folder_path(path.parent, "output folder")
    return path


def ensure_writable_folder(path: str | Path, what: str) -> Path:
    """Create ``path`` (and its parents) and check that files can be written in it; one line if not."""
    path = check_folder_path(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {path} is not writable: {exc.strerror}") from None
    return path


def move_aside(path: str | Path, reason: str = "corrupt") -> Path:
    """Rename a damaged file to ``<name>.<reason>-<UTC time>`` next to it (kept for a human to look at, never
    deleted) and return the new path."""
    path = Path(path)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
    os.replace(path, target)
    return target
