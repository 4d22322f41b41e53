"""``bench list``: every benchmark, backbone and strategy with its options' types and defaults.

The description comes from the registries' option dataclasses (their fields only; nothing is built), but the
modules that register them import torch and Avalanche (seconds). So it is cached as JSON under
``$BENCH_CACHE`` (default ``~/.cache/clcompose``) in a file named from a hash of the suite's own source
files: any change to the code makes a new description, and an unchanged checkout or wheel lists in
milliseconds. ``bench list --refresh`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

CATALOG_VERSION = 1


def _source_fingerprint() -> str:
    import clcompose.bench
    import clcompose.strategies

    h = hashlib.sha256(f"catalog {CATALOG_VERSION}".encode())
    for package in (clcompose.bench, clcompose.strategies):
        root = Path(package.__file__).resolve().parent
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _cache_file(fingerprint: str) -> Path:
    from clcompose.bench.io import cache_dir

    return cache_dir() / "catalog" / f"{fingerprint}.json"


def type_name(hint: Any) -> str:
    """``int``, ``float | None``, ``list[int]``, ``sgd|adam|adamw`` (a Literal's choices)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join(type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", "")
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def describe_options(cls: type) -> list[dict[str, str]]:
    """Name, type and default of every field of an options dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        out.append({"name": f.name, "type": type_name(hints[f.name]), "default": json.dumps(default, default=str)})
    return out


def build_catalog() -> dict[str, Any]:
    """Import the registries and describe them (the slow path)."""
    from clcompose.bench.data.benchmarks import BENCHMARKS
    from clcompose.bench.models.backbones import BACKBONES
    from clcompose.bench.runs.config import LoggerOptions
    from clcompose.strategies.core.registry import STRATEGIES
    from clcompose.strategies.core.training import TrainConfig

    sections = {}
    for title, registry in (("benchmarks", BENCHMARKS), ("backbones", BACKBONES), ("strategies", STRATEGIES)):
        sections[title] = [
            {"name": n, "summary": registry[n].summary, "options": describe_options(registry[n].options)}
            for n in registry.names()
        ]
    train = describe_options(TrainConfig) + describe_options(LoggerOptions)
    sections["train"] = [{"name": "train", "summary": "training settings of every strategy", "options": train}]
    return {"version": CATALOG_VERSION, "sections": sections}


def catalog(refresh: bool = False) -> dict[str, Any]:
    """The cached description, rebuilt when the source changed (or ``refresh``)."""
    from clcompose.bench.io import read_json, write_json_atomic

    path = _cache_file(_source_fingerprint())
    if not refresh:
        data = read_json(path)
        if data is not None and data.get("version") == CATALOG_VERSION:
            return data
    data = build_catalog()
    try:
        write_json_atomic(path, data, overwrite=True)
    except OSError:  # an unwritable cache only costs speed
        pass
    return data


def render(data: dict[str, Any]) -> list[str]:
    lines = []
    for title, entries in data["sections"].items():
        lines.append(f"{title}:")
        for e in entries:
            if title != "train":
                lines.append(f"  {e['name']:24s} {e['summary']}")
            options = e["options"]
            if not options:
                lines.append(f"  {'':24s} options: -")
            for o in options:
                lines.append(f"  {'':24s} {o['name']}: {o['type']} = {o['default']}")
    return lines
