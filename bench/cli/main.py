"""The ``bench`` command line. Heavy libraries are imported inside the verbs, so ``bench --help`` is instant."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from clcompose.strategies.core.registry import ConfigError

SECTION_KEYS = {
    "benchmark": "benchmark_options",
    "backbone": "backbone_options",
    "strategy": "strategy_options",
    "train": "train",
}


class _Parser(argparse.ArgumentParser):
    """argparse with the suite's one-line errors: ``bench: error: …`` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"bench: error: {self.prog}: {message} (see {self.prog} --help)\n")


def parse_value(key: str, raw: str) -> Any:
    """A ``--set`` value: a YAML flow list or mapping (``[0.5, 1]``, ``{grid: [1, 2]}``) is parsed as YAML;
    anything else stays the string it is (each option converts it to its type)."""
    if raw.strip()[:1] not in ("[", "{"):
        return raw
    import yaml

    from clcompose.bench.io import load_yaml, yaml_error_line

    try:
        return load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: {raw!r} is not valid YAML{yaml_error_line(exc)}") from None


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
        out.setdefault(SECTION_KEYS[section], {})[name] = parse_value(key, value)
    return out


def load_config_file(path: str) -> dict[str, Any]:
    from clcompose.bench.io import read_yaml_mapping

    return read_yaml_mapping(Path(path), "config")


def run_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in ("benchmark", "backbone", "strategy", "seed", "stream_seed", "device", "threads"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    shortcuts = {
        "n_experiences": "benchmark_options",
        "per_class": "benchmark_options",
        "test_per_class": "benchmark_options",
        "data_root": "benchmark_options",
        "epochs": "train",
        "batch_size": "train",
        "lr": "train",
        "checkpoint_every_min": "train",
    }
    for key, section in shortcuts.items():
        value = getattr(args, key)
        if value is not None:
            config.setdefault(section, {})[key] = value
    for section, values in parse_assignments(args.set or []).items():
        config.setdefault(section, {}).update(values)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from clcompose.bench.runs.run import run

    path, record = run(run_config_from_args(args), out=args.out, runs_dir=args.runs_dir, progress=not args.quiet)
    m = record["metrics"]
    forgetting = "n/a" if m["forgetting"] is None else f"{m['forgetting']:.4f}"
    print(
        f"{record['run_id']}: final average accuracy {m['final_average_accuracy']:.4f}, forgetting {forgetting}, "
        f"{record['timing']['total_wall_s']:.1f} s → {path}"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from clcompose.bench.cli.catalog import catalog, render

    print("\n".join(render(catalog(refresh=args.refresh))))
    print("(each option: name: type = default; set any of them with --set SECTION.KEY=VALUE)")
    return 0


def _report(report) -> int:
    """Print a sweep report: one line per problem on stderr, the summary on stdout; exit 1 if cells failed."""
    for line in report.problems():
        print(f"bench: {line}", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok or not report.waited else 1


def _load_sweep(args: argparse.Namespace):
    from clcompose.bench.sweeps.sweep import load_sweep

    sweep = load_sweep(
        args.file,
        profile=args.profile,
        runs_dir=args.runs_dir,
        overrides=parse_assignments(args.set or []),
        scale=getattr(args, "scale", None),
    )
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        sweep.profile.workers = args.workers
    return sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from clcompose.bench.sweeps.launch import launch

    report = launch(
        _load_sweep(args), kind=args.executor, dry_run=args.dry_run, wait=not args.no_wait, progress=not args.quiet
    )
    return 0 if report is None else _report(report)


def cmd_status(args: argparse.Namespace) -> int:
    from clcompose.bench.sweeps import store
    from clcompose.bench.sweeps.reports import status_table

    sweep = _load_sweep(args)
    queued = store.squeue_states()
    states = {c.hash: store.cell_state(c.run_dir, queued) for c in sweep.cells}
    print(f"sweep {sweep.name} ({sweep.path}), run folders in {sweep.output}")
    print("\n".join(status_table(sweep, states)))
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from clcompose.bench.io import display_path
    from clcompose.bench.sweeps.select import write_selection

    written = write_selection(_load_sweep(args), args.out)
    print(f"selection → {', '.join(display_path(p) for p in written)}")
    return 0


def _sweep_options(args: argparse.Namespace) -> dict[str, Any]:
    """How sweep files among the paths are expanded (as `bench sweep` was given them)."""
    options = {"profile": args.profile, "runs_dir": args.runs_dir, "overrides": parse_assignments(args.set or [])}
    return options | {"scale": args.scale}


def cmd_aggregate(args: argparse.Namespace) -> int:
    from clcompose.bench.report.leaderboard import write_aggregate
    from clcompose.bench.report.output import check_output

    out = check_output(args.out, args.overwrite_committed)
    written, results = write_aggregate(args.paths, out, **_sweep_options(args))
    _report_skipped(results)
    print(f"{len(results.runs)} records → {len(written)} tables in {out}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from clcompose.bench.report.leaderboard import build_leaderboard
    from clcompose.bench.report.output import check_output

    out = check_output(args.out, args.overwrite_committed)
    page, results = build_leaderboard(args.paths, out, plots=not args.no_plots, **_sweep_options(args))
    _report_skipped(results)
    print(f"{len(results.runs)} records → {page}")
    return 0


def cmd_check_targets(args: argparse.Namespace) -> int:
    from clcompose.bench.report.aggregate import load_results
    from clcompose.bench.report.output import require_records
    from clcompose.bench.report.targets import check, load_targets

    if not args.margin >= 0:
        raise ConfigError(f"--margin must be >= 0, got {args.margin}")
    results = load_results(args.paths, **_sweep_options(args))
    require_records(results, list(args.paths))
    _report_skipped(results)
    lines, failures = check(results, load_targets(args.targets), args.margin)
    if not lines:
        raise ConfigError("no finished cell has a paper target (see examples/paper/targets.yaml)")
    print("\n".join(lines))
    print(f"{len(lines) - len(failures)} of {len(lines)} cells within {args.margin:g} points of the paper")
    return 1 if failures else 0


def _report_skipped(results) -> None:
    if results.skipped:
        print(f"bench: skipped {len(results.skipped)} unreadable record file(s):", file=sys.stderr)
        for path, reason in results.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)


def cmd_main(args: argparse.Namespace) -> int:
    from clcompose.bench.report.leaderboard import build_leaderboard
    from clcompose.bench.sweeps.launch import launch

    sweep = _load_sweep(args)
    report = launch(sweep, kind="local", progress=not args.quiet)
    code = _report(report)
    page, results = build_leaderboard(
        [str(sweep.path)],
        Path(args.results),
        runs_dir=sweep.output,
        profile=args.profile,
        overrides=parse_assignments(args.set or []),
    )
    _report_skipped(results)
    print(f"leaderboard of {len(results.runs)} runs → {page}")
    return code


def build_parser() -> argparse.ArgumentParser:
    from clcompose.bench.io import REPO_ROOT, resource_dir

    parser = _Parser(prog="bench", description="Continual-learning benchmark suite (ITA, IEL and baselines).")
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
    p.add_argument(
        "--checkpoint-every-min",
        type=float,
        dest="checkpoint_every_min",
        help="also checkpoint inside an experience every N minutes (0: every mini-batch), to resume mid-way",
    )
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="any option: benchmark.*, backbone.*, strategy.*, train.* (repeatable)",
    )
    p.add_argument(
        "--out",
        help="record path, or a folder (ending in /) for OUT/record.json (default: RUNS_DIR/<run id>/record.json); "
        "never overwritten",
    )
    p.add_argument("--runs-dir", default="runs", dest="runs_dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also not the backbone's pre-training)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("list", help="list benchmarks, backbones and strategies with their options' types and defaults")
    p.add_argument(
        "--refresh",
        action="store_true",
        help="describe the registries live (slow: imports them) and rewrite the shipped description if it changed",
    )
    p.set_defaults(func=cmd_list)

    from clcompose.bench.cli.skills import add_parser as add_skills_parser  # light module: argparse only at import

    add_skills_parser(sub)

    def sweep_args(p: argparse.ArgumentParser, file_default: str | None = None, paths: bool = True) -> None:
        if not paths:
            pass  # aggregate/leaderboard: the sweep files are among their paths
        elif file_default is None:
            p.add_argument("file", help="sweep YAML file (see examples/)")
        else:
            p.add_argument(
                "--sweep", dest="file", default=file_default, help=f"sweep YAML file (default {file_default})"
            )
        p.add_argument(
            "--profile",
            help="cluster profile: a name under slurm/profiles/ or a YAML path (overrides the file's cluster)",
        )
        p.add_argument("--runs-dir", dest="runs_dir", help="where the run folders go (overrides the file's output)")
        p.add_argument(
            "--set",
            action="append",
            metavar="SECTION.KEY=VALUE",
            help="an option for every cell (strategy.*/benchmark.*/backbone.*: every one that has it; repeatable)",
        )
        p.add_argument(
            "--scale", choices=("smoke",), help="smoke: the same cells shrunk to a tiny ViT and generated data (CPU)"
        )

    p = sub.add_parser(
        "sweep", help="run a sweep's missing cells (local processes, in-process debug, or SLURM job arrays)"
    )
    sweep_args(p)
    p.add_argument("--executor", choices=("local", "debug", "slurm"), help="default: the profile's executor")
    p.add_argument("--workers", type=int, help="local executor: parallel worker processes (default: the profile's)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        dest="dry_run",
        help="print the cells and the sbatch parameters; submit nothing",
    )
    p.add_argument(
        "--no-wait", action="store_true", dest="no_wait", help="submit and return (follow with `bench status`)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="show done / running / failed / missing per cell of a sweep")
    sweep_args(p)
    p.set_defaults(func=cmd_status)

    def report_args(p: argparse.ArgumentParser, out_help: str) -> None:
        p.add_argument(
            "paths", nargs="+", help="run folders to search for record.json, record files, or sweep YAML files"
        )
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument(
            "--overwrite-committed",
            action="store_true",
            dest="overwrite_committed",
            help="allow --out to be the committed results/ (or a folder in it)",
        )
        sweep_args(p, paths=False)

    p = sub.add_parser(
        "select", help="pick each strategy's hyperparameters from a finished selection sweep (validation data)"
    )
    sweep_args(p)
    p.add_argument("--out", help="folder for selected.json and its page (default: the file's select.out)")
    p.set_defaults(func=cmd_select)

    from clcompose.bench.cli.skills import add_table_parser as add_skills_table_parser

    add_skills_table_parser(sub, report_args, _sweep_options)

    p = sub.add_parser("aggregate", help="read result records and write per-benchmark tables (CSV, Markdown, LaTeX)")
    report_args(p, "output folder (tables go to OUT/tables; the previous generation's files are replaced)")
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser(
        "leaderboard", help="tables, plots and the leaderboard page OUT/README.md, regenerated from records"
    )
    report_args(p, "output folder (the previous generation's files are replaced)")
    p.add_argument("--no-plots", action="store_true", dest="no_plots")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser(
        "check-targets", help="exit 1 when a finished cell is worse than the paper's number by more than a margin"
    )
    p.add_argument("paths", nargs="+", help="run folders, record files, or sweep YAML files")
    p.add_argument("--margin", type=float, default=1.0, help="points of accuracy below the paper that pass (default 1)")
    p.add_argument("--targets", help="targets file (default examples/paper/targets.yaml)")
    sweep_args(p, paths=False)
    p.set_defaults(func=cmd_check_targets)

    from clcompose.bench.perf.command import add_parser as add_perf_parser  # light module: argparse only at import

    add_perf_parser(sub)

    p = sub.add_parser("main", help="the main job: run examples/default.yaml locally, then regenerate results/")
    sweep_args(p, file_default=str(resource_dir("examples") / "default.yaml"))
    p.add_argument("--results", default=str((REPO_ROOT or Path.cwd()) / "results"), help="leaderboard folder")
    p.add_argument("--workers", type=int, help="parallel worker processes (default: the profile's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one verb. Bad input and an unusable environment (a file where a folder goes, an unwritable folder)
    are one ``bench: error:`` line and exit code 2; output into a closed pipe (``bench status | head``) ends
    quietly with 141 (128 + SIGPIPE)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given (records name it)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then handled below
        return code
    except ConfigError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's own flush at exit would raise again
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:  # e.g. permission denied, no space left, a read-only file system
        where = f": {exc.filename}" if exc.filename else ""
        print(f"bench: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
