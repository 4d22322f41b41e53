"""``bench perf``'s arguments (argparse only at import, so ``bench --help`` stays light)."""

from __future__ import annotations

import argparse
import shlex
import sys

from clcompose.strategies.core.registry import ConfigError

WHAT = ("records", "cli", "strategies", "budgets", "compose", "fisher", "scaling", "all")
COMPOSE_STYLES = ("lora", "ia3", "full")  # = clcompose.bench.perf.compose.STYLES (not imported: --help stays light)


def _list(value: str) -> list:
    return [v if v == "all" or not v.lstrip("-").isdigit() else int(v) for v in value.split(",") if v]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "perf",
        help="benchmarks of the suite: records (aggregation), cli (list/--help latency), strategies, budgets, "
        "compose, fisher, scaling, all",
        description="records: aggregation of synthetic records and `bench --help` latency (the default). "
        "cli, strategies, budgets, compose, fisher, scaling, all: write OUT/perf.json and OUT/README.md (see the README's "
        "Performance).",
    )
    p.add_argument("what", nargs="?", choices=WHAT, default="records")
    g = p.add_argument_group("records")
    g.add_argument("--records", type=int, default=10_000)
    g.add_argument("--help-runs", type=int, default=5, dest="help_runs")
    g.add_argument("--keep", help="keep the synthetic records in this folder")
    g = p.add_argument_group("cli, strategies, budgets, compose, fisher, scaling, all")
    g.add_argument("--out", default="results/perf", help="folder of perf.json and README.md (default results/perf)")
    g.add_argument("--device", help="cpu (default) or cuda[:N]")
    g.add_argument("--threads", type=int, help="torch threads (default 1)")
    g.add_argument("--repeats", type=int, help="interleaved repeats of the strategies, medians of the Fisher (1)")
    g.add_argument("--strategies", type=lambda v: v.split(","), help="default naive,ita,iel,task-arithmetic")
    g.add_argument("--per-class", type=int, dest="per_class", help="shrink the main job (tests)")
    g.add_argument("--test-per-class", type=int, dest="test_per_class")
    g.add_argument("--n-experiences", type=int, dest="n_experiences")
    g.add_argument("--epochs", type=int)
    g.add_argument("--fisher", choices=("exact", "topk", "sampled"), help="ITA/IEL's estimator (default exact)")
    g.add_argument("--fisher-max-examples", type=int, dest="fisher_max_examples", help="default: every example (None)")
    g.add_argument("--fisher-examples", type=_list, dest="fisher_examples", help="e.g. 64,all")
    g.add_argument("--fisher-classes", type=int, dest="fisher_classes", help="labels of the exact Fisher (10)")
    g.add_argument("--vmap", action="store_true", default=None, help="also time the vmap Fisher (slow)")
    g.add_argument(
        "--budget-epochs", type=_list, dest="budget_epochs", help="epoch budgets of `budgets` (default 2,5,20)"
    )
    g.add_argument(
        "--budget-strategies", type=lambda v: v.split(","), dest="budget_strategies", help="default naive,ita,iel"
    )
    g.add_argument("--scaling-examples", type=_list, dest="scaling_examples", help="default 64,256,1024,all")
    g.add_argument("--scaling-experiences", type=_list, dest="scaling_experiences", help="default 5,10,20")
    g.add_argument(
        "--scaling-align-epochs-per-task",
        type=_list,
        dest="scaling_align_epochs_per_task",
        help="alignment schedules of the experiences table (default 5,0: the reference's, then a fixed one)",
    )
    g.add_argument(
        "--scaling-examples-per-experience", type=int, dest="scaling_examples_per_experience", help="default 40"
    )
    g.add_argument("--compose-styles", type=lambda v: v.split(","), dest="compose_styles", help="default lora,ia3,full")
    g.add_argument("--compose-tasks", type=_list, dest="compose_tasks", help="task vectors composed (1,5,20)")
    g.add_argument("--compose-rounds", type=int, dest="compose_rounds", help="interleaved rounds (7)")
    g.add_argument("--compose-eval-batch", type=int, dest="compose_eval_batch", help="eval batch size (256)")
    g.add_argument("--cli-runs", type=int, dest="cli_runs", help="runs per command (3)")
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_perf)


def cmd_perf(args: argparse.Namespace) -> int:
    if args.what == "records":
        from clcompose.bench.perf.records import main

        return main(records=args.records, help_runs=args.help_runs, keep=args.keep)
    from clcompose.bench.perf.suite import DEFAULTS, main

    settings = {k: getattr(args, k, None) for k in DEFAULTS}
    counts = ("repeats", "threads", "cli_runs", "per_class", "test_per_class", "n_experiences", "epochs")
    for key in counts + ("compose_rounds", "compose_eval_batch"):
        if settings.get(key) is not None and settings[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    unknown = sorted(set(settings.get("compose_styles") or ()) - set(COMPOSE_STYLES))
    if unknown:
        raise ConfigError(
            f"--compose-styles: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(COMPOSE_STYLES)}"
        )
    checked = (
        ("scaling_align_epochs_per_task", 0),
        ("scaling_experiences", 1),
        ("compose_tasks", 1),
        ("budget_epochs", 1),
    )
    for key, least in checked:
        values = settings.get(key)
        if values is not None and not (values and all(isinstance(v, int) and v >= least for v in values)):
            raise ConfigError(
                f"--{key.replace('_', '-')} must be integers >= {least}, got {','.join(map(str, values))}"
            )
    if args.what in ("strategies", "budgets", "all"):  # before any run: a misspelt name fails at once
        from clcompose.strategies.core.registry import STRATEGIES

        for name in (settings.get("strategies") or []) + (settings.get("budget_strategies") or []):
            STRATEGIES[name]  # ConfigError: unknown strategy 'name'; valid: …
    if args.device is not None and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    return main(
        args.what,
        args.out,
        settings,
        command=shlex.join(["bench", *getattr(args, "argv", sys.argv[1:])]),
        progress=not args.quiet,
    )
