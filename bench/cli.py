"""The ``bench`` command line. Heavy libraries are imported inside the verbs, so ``bench --help`` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from strategies.registry import ConfigError

SECTION_KEYS = {
    "benchmark": "benchmark_options",
    "backbone": "backbone_options",
    "strategy": "strategy_options",
    "train": "train",
}


def parse_assignments(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["strategy.ewc_lambda=100", "train.epochs=2"]`` → ``{"strategy_options": {...}, "train": {...}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        if section not in SECTION_KEYS:
            raise ConfigError(f"--set section must be one of {', '.join(SECTION_KEYS)}, got {section!r}")
        out.setdefault(SECTION_KEYS[section], {})[name] = value
    return out


def load_config_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of run settings")
    return data


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in ("benchmark", "backbone", "strategy", "seed", "stream_seed", "device", "threads"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    shortcuts = {"n_experiences": "benchmark_options", "per_class": "benchmark_options", "test_per_class": "benchmark_options",
                 "data_root": "benchmark_options", "epochs": "train", "batch_size": "train", "lr": "train"}  # fmt: skip
    for key, section in shortcuts.items():
        value = getattr(args, key)
        if value is not None:
            config.setdefault(section, {})[key] = value
    for section, values in parse_assignments(args.set or []).items():
        config.setdefault(section, {}).update(values)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from bench.run import run

    path, record = run(run_config_from_args(args), out=args.out, runs_dir=args.runs_dir, progress=not args.quiet)
    m = record["metrics"]
    forgetting = "n/a" if m["forgetting"] is None else f"{m['forgetting']:.4f}"
    print(f"{record['run_id']}: final average accuracy {m['final_average_accuracy']:.4f}, forgetting {forgetting}, "
          f"{record['timing']['total_wall_s']:.1f} s → {path}")  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bench.backbones import BACKBONES
    from bench.benchmarks import BENCHMARKS
    from strategies.registry import STRATEGIES

    for title, registry in (("benchmarks", BENCHMARKS), ("backbones", BACKBONES), ("strategies", STRATEGIES)):
        print(f"{title}:")
        for name in registry.names():
            entry = registry[name]
            fields = ", ".join(entry.options.field_names()) or "-"
            print(f"  {name:24s} {entry.summary}\n  {'':24s} options: {fields}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Continual-learning benchmark suite (ITA, IEL and baselines).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one seeded run and write its result record")
    p.add_argument("--config", help="YAML file with run settings (flags override it)")
    p.add_argument("--benchmark")
    p.add_argument("--backbone")
    p.add_argument("--strategy")
    p.add_argument("--seed", type=int)
    p.add_argument("--stream-seed", type=int, dest="stream_seed", help="class order and subsample seed")
    p.add_argument("--n-experiences", type=int, dest="n_experiences")
    p.add_argument("--per-class", type=int, dest="per_class", help="training images kept per class")
    p.add_argument("--test-per-class", type=int, dest="test_per_class")
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="any option: benchmark.*, backbone.*, strategy.*, train.* (repeatable)")  # fmt: skip
    p.add_argument("--out", help="record path (default: RUNS_DIR/<run id>/record.json); never overwritten")
    p.add_argument("--runs-dir", default="runs", dest="runs_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list benchmarks, backbones and strategies with their options")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
