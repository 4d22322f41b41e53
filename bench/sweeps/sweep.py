"""Sweeps: benchmarks × backbones × strategies (with small grids) × seeds, expanded into cells.

A sweep file is YAML::

    name: digits                     # optional (default: the file name)
    output: runs/digits              # optional (default: runs/<name>); relative to the working directory
    cluster: local                   # a profile under slurm/profiles/ (or a path); --profile overrides it
    seeds: [0, 1, 2]                 # or a count: 3
    max_cells: 10000                 # optional: the most cells the file may expand to (default 10,000)
    stream_seed: seed                # class order per seed (default) or one fixed integer for every run
    benchmarks: {split-digits: {n_experiences: 5, per_class: 40}}
    backbones: {small-cnn: {source: digits, pretrain_epochs: 1}}
    strategies:                      # a mapping name → options, or a list of names
      naive: {}
      ewc: {ewc_lambda: {grid: [10, 100]}}     # {grid: [...]} makes a value an axis of the sweep
      ita: {alpha: 0.1, train: {optimizer: adamw, lr: 0.001}}   # per-strategy training (and `backbone:`) overrides
    train: {epochs: 2, lr: 0.05}
    selected: results/selection/selected.json   # optional: start each strategy entry from its selected values
    # select: {rule: final_average_accuracy, out: results/selection}   # or: this file IS a selection sweep

A strategies key ``name@tag`` (``ita@alpha0: {alpha: 0}``) is one more entry of strategy ``name``, so one
strategy can appear with several fixed settings; ``select``/``selected`` are explained in :mod:`.select`.

Each cell is one :class:`~bench.run.RunConfig`; its identity is the content hash of the fully resolved config
(:func:`bench.run.config_hash`), and its run folder ``<output>/<run id>`` is named from that hash, so the same
run is never done twice, whichever sweep, executor or ``bench run`` asks for it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clcompose.bench.io import check_folder_path, read_yaml_mapping
from clcompose.strategies.core.registry import ConfigError

SWEEP_KEYS = (
    "name",
    "description",
    "output",
    "cluster",
    "seeds",
    "stream_seed",
    "max_cells",
    "benchmarks",
    "backbones",
    "strategies",
    "train",
    "select",
    "selected",
    "compare",  # pairs of strategy entries the leaderboard compares per seed (bench.report.controls)
)
MAX_CELLS = 10_000  # a larger expansion is refused unless the file raises max_cells (a typo like seeds: 100000)
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")  # one plain folder name: no '/', no '..', no hidden folder
SEED_LIMIT = 2**32
AXES = (("benchmarks", "benchmark"), ("backbones", "backbone"), ("strategies", "strategy"))


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: the config to run, its content hash and its run folder."""

    config: dict[str, Any]  # RunConfig.from_dict input
    hash: str  # config_hash of the resolved config
    run_id: str
    run_dir: Path
    label: str  # e.g. "split-digits small-cnn ewc ewc_lambda=10 s0"
    entry: str = ""  # the strategies entry it comes from, e.g. "ita@alpha0"
    varied: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # its grid values per section

    @property
    def record_path(self) -> Path:
        return self.run_dir / "record.json"


@dataclasses.dataclass
class Sweep:
    """A validated sweep file, expanded for one cluster profile."""

    name: str
    path: Path
    output: Path
    profile: Any  # bench.profiles.ClusterProfile
    profile_path: Path
    cells: list[Cell]
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # the file's mapping, as read


def _seeds(value: Any, where: str) -> Sequence[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(f"{where}: seeds must be a positive count or a list of seeds, got {value}")
        if value > SEED_LIMIT:
            raise ConfigError(f"{where}: seeds must be a count of at most 2**32 seeds, got {value}")
        return range(value)  # a lazy range: the cell count is checked before anything is expanded
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: seeds must be a positive count or a non-empty list of seeds, got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where}: seeds must be non-negative integers, got {s!r}")
        if s >= SEED_LIMIT:
            raise ConfigError(f"{where}: seeds must be below 2**32 = {SEED_LIMIT} (NumPy's seed range), got {s}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds has duplicates: {value}")
    return list(value)


def _axis(data: dict[str, Any], key: str, where: str) -> list[tuple[str, dict[str, Any]]]:
    """``{name: options}`` or ``[name, ...]`` → ``[(name, options)]``."""
    value = data.get(key)
    if value is None:
        raise ConfigError(f"{where}: {key} is missing (a mapping of names to options, or a list of names)")
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must list names (strings), got {value!r}")
        value = {v: {} for v in value}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty mapping of names to options, got {value!r}")
    out = []
    for name, options in value.items():
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: {key}.{name} must be a mapping of options, got {options!r}")
        out.append((str(name), options))
    return out


def _grid_axes(options: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, list]]:
    fixed, axes = {}, {}
    for key, value in options.items():
        if isinstance(value, dict) and set(value) == {"grid"}:
            values = value["grid"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key}: grid must be a non-empty list, got {values!r}")
            axes[key] = values
        else:
            fixed[key] = value
    return fixed, axes


def grid(options: dict[str, Any], where: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Expand ``{key: {grid: [a, b]}}`` values: ``[(options, {key: a}), (options, {key: b})]`` (varied keys second)."""
    fixed, axes = _grid_axes(options, where)
    combos = []
    for values in itertools.product(*axes.values()):
        varied = dict(zip(axes, values))
        combos.append((fixed | varied, varied))
    return combos


def grid_size(options: dict[str, Any], where: str) -> int:
    """How many combinations :func:`grid` would give, without building them."""
    return math.prod(len(v) for v in _grid_axes(options, where)[1].values())


def _resolve(config: dict[str, Any], where: str, label: str):
    from clcompose.bench.runs.config import RunConfig

    try:
        return RunConfig.from_dict(config).resolve()
    except ConfigError as exc:
        message = str(exc)
        lists = [
            k
            for section in ("benchmark_options", "backbone_options", "strategy_options", "train")
            for k, v in config[section].items()
            if isinstance(v, list) and k in message
        ]
        hint = f" (for a sweep over values write {lists[0]}: {{grid: [...]}})" if lists else ""
        raise ConfigError(f"{where}: {label}: {message}{hint}") from None


def _strategy_parts(axis: list[tuple[str, dict[str, Any]]], where: str) -> list[tuple[str, dict, dict, dict]]:
    """``(name, own options, train overrides, backbone overrides)`` per entry of the strategies axis."""
    parts = []
    for name, opts in axis:
        opts = dict(opts)
        strat_train = opts.pop("train", None) or {}
        if not isinstance(strat_train, dict):
            raise ConfigError(
                f"{where}: strategies.{name}.train must be a mapping of training options, got {strat_train!r}"
            )
        strat_backbone = opts.pop("backbone", None) or {}
        if not isinstance(strat_backbone, dict):
            raise ConfigError(
                f"{where}: strategies.{name}.backbone must be a mapping of backbone options, got {strat_backbone!r}"
            )
        parts.append((name, opts, strat_train, strat_backbone))
    return parts


def _apply_overrides(axes: dict[str, list], overrides: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    """Merge ``--set`` values into every component of the sweep that has that option (``train.*``: every cell);
    returns the train overrides. A value no component of the sweep takes is an error."""
    from clcompose.bench.data.benchmarks import BENCHMARKS
    from clcompose.bench.models.backbones import BACKBONES
    from clcompose.strategies.core.registry import STRATEGIES

    registries = {"benchmark_options": ("benchmarks", BENCHMARKS), "backbone_options": ("backbones", BACKBONES)}
    registries["strategy_options"] = ("strategies", STRATEGIES)
    for section, values in overrides.items():
        if section == "train" or not values:
            continue
        key, registry = registries[section]
        used: set[str] = set()
        entries = []
        for name, opts in axes[key]:
            fields = set(registry[name.partition("@")[0]].options.field_names())
            taken = {k: v for k, v in values.items() if k in fields}
            used |= set(taken)
            entries.append((name, opts | taken))
        axes[key] = entries
        unused = sorted(set(values) - used)
        if unused:
            kind = section.removesuffix("_options")
            raise ConfigError(
                f"{where}: --set {kind}.{unused[0]}: no {kind} of the sweep ({', '.join(n for n, _ in entries)}) "
                f"has an option {unused[0]!r}"
            )
    return dict(overrides.get("train") or {})


def expand(
    data: dict[str, Any],
    profile: Any,
    output: Path,
    where: str,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[Cell]:
    """All cells of a parsed sweep file, in a stable order (benchmark, backbone, seed, strategy, grid).

    ``overrides`` (``--set``, as :func:`clcompose.bench.cli.main.parse_assignments` gives them) apply to every
    cell. More than ``max_cells`` cells (default :data:`MAX_CELLS`) are refused before any is built.
    """
    from clcompose.bench.runs.config import config_hash
    from clcompose.bench.sweeps.select import check_select, load_selected, winner_for

    check_select(data, where)
    winners = load_selected(data["selected"], where) if data.get("selected") is not None else None
    seeds = _seeds(data.get("seeds"), where)
    stream_seed = data.get("stream_seed", "seed")
    if stream_seed != "seed" and (isinstance(stream_seed, bool) or not isinstance(stream_seed, int) or stream_seed < 0):
        raise ConfigError(f"{where}: stream_seed must be 'seed' or a non-negative integer, got {stream_seed!r}")
    if stream_seed != "seed" and stream_seed >= SEED_LIMIT:
        raise ConfigError(
            f"{where}: stream_seed must be below 2**32 = {SEED_LIMIT} (NumPy's seed range), got {stream_seed}"
        )
    axes = {key: _axis(data, key, where) for key, _ in AXES}
    train = data.get("train") or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{where}: train must be a mapping of training options, got {train!r}")
    train_override = _apply_overrides(axes, overrides or {}, where) if overrides else {}
    strategies = _strategy_parts(axes["strategies"], where)
    _check_size(data, seeds, axes, strategies, train, train_override, where)

    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for (bench_name, bench_opts), (bb_name, bb_opts) in itertools.product(axes["benchmarks"], axes["backbones"]):
        for seed, (entry, strat_opts, strat_train, strat_backbone) in itertools.product(seeds, strategies):
            strat_name = entry.partition("@")[0]
            strat_opts = dict(strat_opts)
            source = strat_opts.pop("selected_from", None)
            if source is not None and winners is None:
                raise ConfigError(f"{where}: strategies.{entry}.selected_from needs a `selected:` file")
            won = winner_for(winners, bench_name, source or entry, strict=source is not None, where=where)
            if won is not None:  # the entry's own options win over the selected ones
                strat_opts, strat_train = won["strategy"] | strat_opts, won["train"] | strat_train
            backbone_override = {k: v for k, v in bb_opts.items() if k in (overrides or {}).get("backbone_options", {})}
            for (bo, bv), (ko, kv), (so, sv), (to, tv) in itertools.product(
                grid(bench_opts, f"{where}: benchmarks.{bench_name}"),
                grid(bb_opts | strat_backbone | backbone_override, f"{where}: backbones.{bb_name}"),
                grid(strat_opts, f"{where}: strategies.{entry}"),
                grid(train | strat_train | train_override, f"{where}: train"),
            ):
                varied = " ".join(f"{k}={v}" for k, v in (bv | kv | sv | tv).items())
                label = " ".join(filter(None, [bench_name, bb_name, entry, varied, f"s{seed}"]))
                config = {
                    "benchmark": bench_name,
                    "backbone": bb_name,
                    "strategy": strat_name,
                    "seed": seed,
                    "stream_seed": seed if stream_seed == "seed" else stream_seed,
                    "benchmark_options": dict(bo),
                    "backbone_options": dict(ko),
                    "strategy_options": dict(so),
                    "train": dict(to),
                    "device": profile.device,
                    "threads": profile.threads,
                }
                resolved = _resolve(config, where, label)
                digest = config_hash(resolved.to_dict())
                if digest in seen:
                    raise ConfigError(
                        f"{where}: cells {seen[digest]!r} and {label!r} are the same run (duplicate grid values?)"
                    )
                seen[digest] = label
                run_id = resolved.run_id()
                values = {"benchmark": bv, "backbone": kv, "strategy": sv, "train": tv}
                cells.append(Cell(config, digest, run_id, output / run_id, label, entry, values))
    return cells


def _check_size(data, seeds, axes, strategies, train, train_override, where: str) -> None:
    """Refuse an expansion beyond ``max_cells`` before building any cell (a dry-run of 100,000 cells took 38 s)."""
    limit = data.get("max_cells", MAX_CELLS)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{where}: max_cells must be a positive integer, got {limit!r}")
    n_bench = sum(grid_size(o, f"{where}: benchmarks.{n}") for n, o in axes["benchmarks"])
    per_seed = sum(
        grid_size(bb_opts | strat_backbone, f"{where}: backbones.{bb}")
        * grid_size(strat_opts, f"{where}: strategies.{name}")
        * grid_size(train | strat_train | train_override, f"{where}: train")
        for bb, bb_opts in axes["backbones"]
        for name, strat_opts, strat_train, strat_backbone in strategies
    )
    count = n_bench * per_seed * len(seeds)
    if count > limit:
        raise ConfigError(
            f"{where}: expands to {count:,} cells ({len(seeds):,} seeds), more than max_cells = {limit:,}; "
            f"if you mean it, add `max_cells: {count}` to the sweep file"
        )


def load_sweep_data(path: str | Path) -> dict[str, Any]:
    """A sweep file's mapping, its top-level keys checked (nothing expanded)."""
    data = read_yaml_mapping(Path(path), "sweep")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SWEEP_KEYS)}")
    return data


def load_sweep(
    path: str | Path,
    profile: str | None = None,
    runs_dir: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    scale: str | None = None,
) -> Sweep:
    """Read, validate and expand a sweep file (``profile`` and ``runs_dir`` override its cluster and output,
    ``overrides`` (``--set``) the options of every cell; ``scale="smoke"``: :mod:`.scale`'s tiny version)."""
    from clcompose.bench.sweeps.profiles import load_profile
    from clcompose.bench.sweeps.scale import apply_scale

    path = Path(path)
    data = apply_scale(load_sweep_data(path), scale, str(path))
    where = str(path)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{where}: name must be a plain folder name (letters, digits and . _ + -, not starting with '.' or '-'; "
            f"no '/'), got {name!r}"
        )
    cluster = profile or data.get("cluster", "local")
    if not isinstance(cluster, str):
        raise ConfigError(f"{where}: cluster must name a profile, got {cluster!r}")
    prof, prof_path = load_profile(cluster, relative_to=path.parent)
    output = runs_dir if runs_dir is not None else data.get("output", f"runs/{name}")
    if not isinstance(output, (str, Path)) or not str(output).strip():
        raise ConfigError(f"{where}: output must be a folder path, got {output!r}")
    what = "--runs-dir" if runs_dir is not None else f"{where}: output"
    output = check_folder_path(Path(output).expanduser(), what).absolute()
    cells = expand(data, prof, output, where, overrides)
    return Sweep(name=name, path=path, output=output, profile=prof, profile_path=prof_path, cells=cells, data=data)
