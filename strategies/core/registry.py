"""Name registries and validated option dataclasses shared by strategies, benchmarks and backbones."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar


class ConfigError(ValueError):
    """A user-facing configuration problem (unknown name, bad value); its message is one line."""


T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: T
    options: type[Options]
    summary: str


class Registry(Generic[T]):
    """Maps names to factories plus the :class:`Options` dataclass that configures them.

    >>> STRATEGIES = Registry("strategy")
    >>> @STRATEGIES.register("naive", NaiveOptions)
    ... def build_naive(...): ...
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._modules = modules  # imported on first lookup, so that importing the registry stays cheap
        self._loaded = not modules

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                importlib.import_module(module)

    def register(self, name: str, options: type[Options] | None = None) -> Callable[[T], T]:
        def decorate(factory: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            summary = (getattr(factory, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = Entry(name, factory, options or Options, summary[0] if summary else "")
            return factory

        return decorate

    def __getitem__(self, name: str) -> Entry[T]:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._entries))}") from None

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (possibly a string from the command line) to the annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if (origin is tuple or hint is tuple) else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value  # exact, however large (float() would round or overflow)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            try:
                return int(value)  # exact (float() would round)
            except ValueError:  # beyond Python's limit on digits converted from a string
                raise ConfigError(f"{where} must be an integer of reasonable size, got {len(value)} digits") from None
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if not as_float.is_integer():  # also NaN and ±inf
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{where} must be a finite number, got an integer of {value.bit_length()} bits") from None
        if not math.isfinite(out):  # NaN, ±inf, and literals beyond the float range such as 1e400
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    return value


@dataclasses.dataclass
class Options:
    """Base class of every options dataclass: typed fields, validated on construction.

    Subclasses validate value ranges in ``check()`` by calling :meth:`require`.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._where(f.name)))
        self.check()

    def check(self) -> None:
        """Validate value ranges; raise :class:`ConfigError` via :meth:`require`."""

    def _where(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    def require(self, condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ConfigError(f"{self._where(name)} {rule}, got {getattr(self, name)!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, what: str | None = None) -> Options:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            valid = ", ".join(cls.field_names()) or "(none)"
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {what or cls.__name__}; valid: {valid}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STRATEGIES: Registry = Registry(
    "strategy",
    modules=(
        "clcompose.strategies.baselines.classic",
        "clcompose.strategies.baselines.derpp",
        "clcompose.strategies.baselines.slca",
        "clcompose.strategies.prompts.l2p",
        "clcompose.strategies.prompts.coda_prompt",
        "clcompose.strategies.prompts.inflora",
        "clcompose.strategies.task_vectors.ita",
        "clcompose.strategies.task_vectors.iel",
        "clcompose.strategies.task_vectors.task_arithmetic",
        "clcompose.strategies.task_vectors.tangent",
        "clcompose.strategies.task_vectors.magmax",
        "clcompose.strategies.task_vectors.probe",
        "clcompose.strategies.meta.learner",
        "clcompose.strategies.templates.task_aware",
        "clcompose.strategies.templates.vectors",
    ),
)
"""Every strategy of the suite: ``STRATEGIES[name].factory(model, options, train_config, evaluator=, device=, plugins=)``."""
