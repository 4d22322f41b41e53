"""The output folder of ``bench aggregate``/``bench leaderboard``: checked, guarded and tracked.

- The folder must be one (an existing file there is one ``bench: error:`` line).
- The committed leaderboards (``results/`` of the checkout and the folders inside it) are only regenerated on
  purpose: ``bench main`` writes ``results/``, and the commands write there only with ``--overwrite-committed``.
- Every generation lists what it wrote in ``<out>/.bench-outputs.json``; the next generation into the same
  folder first removes those files, so tables of benchmarks (or plots) that are gone from the records do not
  stay behind looking current. Files it did not write are left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from clcompose.bench.io import REPO_ROOT, check_folder_path, display_path, write_json_atomic
from clcompose.strategies.core.registry import ConfigError

MANIFEST = ".bench-outputs.json"
COMMITTED_FLAG = "--overwrite-committed"


def committed_results(out: str | Path) -> bool:
    """Whether ``out`` is the checkout's committed ``results/`` or a folder inside it."""
    if REPO_ROOT is None:
        return False
    results = (REPO_ROOT / "results").resolve()
    target = Path(out).expanduser().resolve()
    return target == results or results in target.parents


def check_output(out: str | Path, overwrite_committed: bool = False) -> Path:
    """``out`` as a folder to write into, refusing a file and (unless asked) the committed leaderboards."""
    out = check_folder_path(out, "output folder")
    if committed_results(out) and not overwrite_committed:
        raise ConfigError(
            f"{display_path(out)} is a committed leaderboard (results/); `bench main` regenerates results/, "
            f"or pass {COMMITTED_FLAG} to replace it from these records"
        )
    return out


def remove_previous(out: Path) -> list[Path]:
    """Remove the files the previous generation listed in ``out``'s manifest; returns them."""
    manifest = Path(out) / MANIFEST
    try:
        listed = json.loads(manifest.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    removed = []
    root = Path(out).resolve()
    for name in listed if isinstance(listed, list) else []:
        path = (Path(out) / str(name)).resolve()
        if root not in path.parents:  # only files inside the folder, whatever the manifest says
            continue
        if path.is_file():
            path.unlink()
            removed.append(path)
    for folder in sorted({p.parent for p in removed}, key=lambda p: len(p.parts), reverse=True):
        while folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    manifest.unlink(missing_ok=True)
    return removed


def write_manifest(out: Path, files: Iterable[Path], command: str) -> Path:
    root = Path(out).resolve()
    names = sorted({Path(f).resolve().relative_to(root).as_posix() for f in files})
    return write_json_atomic(Path(out) / MANIFEST, {"written_by": command, "files": names}, overwrite=True)


def require_records(results, paths: list[str]) -> None:
    """0 records is an error (exit 2), not an empty page: usually a wrong path, --runs-dir or --profile."""
    if len(results.runs):
        return
    skipped = f"; {len(results.skipped)} unreadable file(s) skipped" if results.skipped else ""
    raise ConfigError(
        f"no result records found in {', '.join(paths)}{skipped}; nothing written (for a sweep file that ran with "
        "--runs-dir or --profile, pass the same options here)"
    )
