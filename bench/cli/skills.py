"""``bench skills RUN_DIR``: unlearning and specialisation over a finished run's saved task vectors."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clcompose.strategies.core.registry import ConfigError

TASK_VECTOR_STRATEGIES = ("ita", "iel", "task-arithmetic")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "skills",
        help="unlearn / specialise a finished ITA, IEL or task-arithmetic run by re-weighting its task vectors",
    )
    p.add_argument("run_dir", help="the run's folder (holds record.json and task_vectors.safetensors)")
    p.add_argument("--target", type=int, action="append", help="experience(s) to edit (default: every experience)")
    p.add_argument(
        "--weight", type=float, default=1.0, help="specialisation weight w of the target (default 1: θ0 + τ_target)"
    )
    p.add_argument("--out", help="report path (default: RUN_DIR/skills.json); never overwritten")
    p.add_argument(
        "--head-control",
        action="store_true",
        dest="head_control",
        help="also apply each edit to the heads instead of the task vectors (rows with applied_to: heads)",
    )
    p.set_defaults(func=cmd_skills)


def load_run(run_dir: Path):
    """Rebuild a finished run's composed model (θ0 from its backbone config + saved task vectors) and its test stream."""
    import torch

    from clcompose.bench.data.benchmarks import build_benchmark
    from clcompose.bench.models.backbones import build_backbone
    from clcompose.bench.runs.config import RunConfig
    from clcompose.bench.runs.record import read_record
    from clcompose.strategies.task_vectors.composable import ComposableNet
    from clcompose.strategies.task_vectors.options import layer_selection
    from clcompose.strategies.task_vectors.skills import load_task_vectors

    record_path = run_dir / "record.json"
    if not record_path.is_file():
        raise ConfigError(f"{run_dir} holds no record.json; pass a finished run's folder")
    record = read_record(record_path)
    strategy = record["config"]["strategy"]
    if strategy not in TASK_VECTOR_STRATEGIES:
        raise ConfigError(
            f"run {record['run_id']} used strategy {strategy!r}; skills need one of {', '.join(TASK_VECTOR_STRATEGIES)}"
        )
    vectors = run_dir / "task_vectors.safetensors"
    if not vectors.is_file():
        raise ConfigError(f"{vectors} is missing; the run did not save its task vectors")
    cfg = RunConfig.from_dict(record["config"])
    resolved = cfg.resolve()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    bm = build_benchmark(cfg.benchmark, resolved.benchmark, cfg.stream_seed)
    backbone = build_backbone(cfg.backbone, resolved.backbone)
    opts = resolved.strategy
    model = ComposableNet(
        backbone,
        backbone.out_features,
        opts.tuning,
        opts.rank,
        layer_selection(opts.layers),
        "composed" if strategy == "iel" else "individual",
    )
    try:
        load_task_vectors(model, vectors)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{vectors} does not match the run's model: {exc}") from None
    except Exception as exc:  # safetensors' SafetensorError on a truncated or corrupted file, and the like
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"{vectors} is unreadable (truncated or corrupted?): {type(exc).__name__}: {first}; "
            "re-run the run to save its task vectors again"
        ) from None
    model.eval()
    batches = []
    for exp in bm.test_stream:
        loader = torch.utils.data.DataLoader(exp.dataset, batch_size=512)
        for x, y, *_ in loader:
            batches.append((exp.current_experience, x, y))
    return record, model, batches


def skills_report(model, batches, targets: list[int], weight: float, head_control: bool = False) -> list[dict]:
    """For each target: accuracy of the run's composition, of unlearning (drop / negate) and of specialisation;
    with ``head_control`` also the same edits applied to the heads instead of the task vectors (rows with
    ``applied_to: heads``; see :mod:`clcompose.strategies.task_vectors.skills`)."""
    from clcompose.strategies.task_vectors.skills import (
        class_il_accuracy,
        composed_logits,
        edit_accuracy,
        edit_head_logits,
        head_scales,
        specialize_coefficients,
        unlearn_coefficients,
    )

    base = model.composed_coefficients()
    head_classes = model.heads.head_classes
    scored = composed_logits(model, base, batches)  # the unedited model, shared by every target and the control
    rows = []
    for k in targets:
        edits = {
            "composed": base,
            "unlearn_drop": unlearn_coefficients(base, k, "drop"),
            "unlearn_negate": unlearn_coefficients(base, k, "negate"),
            "specialize": specialize_coefficients(base, k, weight),
        }
        for name, coeffs in edits.items():
            if name == "composed":
                acc = class_il_accuracy(scored, k, head_classes[k])
            else:
                acc = edit_accuracy(model, coeffs, batches, k)
            row = {"target": k, "edit": name, "coefficients": [round(c, 6) for c in coeffs]}
            rows.append(row | ({"applied_to": "task_vectors"} if head_control else {}) | acc)
        if not head_control:
            continue
        for name, coeffs in edits.items():
            if name == "composed":
                continue
            scales = head_scales(base, coeffs)
            edited = [(e, edit_head_logits(z, head_classes, scales), y) for e, z, y in scored]
            acc = class_il_accuracy(edited, k, head_classes[k])
            row = {"target": k, "edit": name, "applied_to": "heads", "coefficients": [round(c, 6) for c in base]}
            rows.append(row | {"head_scales": [round(r, 6) for r in scales]} | acc)
    return rows


def print_report(rows: list[dict]) -> None:
    print(f"{'target':>6} {'edit':22} {'acc target':>10} {'acc rest':>9} {'target (own classes)':>21}")
    for r in rows:
        rest = "n/a" if r["acc_rest"] is None else f"{r['acc_rest']:.4f}"
        edit = r["edit"] + (" (heads)" if r.get("applied_to") == "heads" else "")
        print(f"{r['target']:>6} {edit:22} {r['acc_target']:>10.4f} {rest:>9} {r['acc_target_own_classes']:>21.4f}")


def cmd_skills(args: argparse.Namespace) -> int:
    from clcompose.bench.io import utc_now, write_json_atomic

    run_dir = Path(args.run_dir)
    if not 0.0 <= args.weight <= 1.0:
        raise ConfigError(f"--weight must be in [0, 1], got {args.weight}")
    from clcompose.bench.io import record_path_from

    out = record_path_from(args.out, "skills.json") if args.out else run_dir / "skills.json"
    if out.exists():
        raise ConfigError(f"{out} already exists; reports are never overwritten (choose another --out)")
    record, model, batches = load_run(run_dir)
    t = model.pool.num_tasks
    targets = args.target if args.target else list(range(t))
    bad = [k for k in targets if not 0 <= k < t]
    if bad:
        raise ConfigError(f"target experience(s) {bad} not in the run (0..{t - 1})")
    head_control = getattr(args, "head_control", False)
    rows = skills_report(model, batches, targets, args.weight, head_control)
    report = {"run_id": record["run_id"], "created": utc_now(), "weight": args.weight, "rows": rows}
    write_json_atomic(out, report | ({"head_control": True} if head_control else {}))
    print_report(rows)
    print(f"→ {out}")
    return 0


def compute_report(run_dir: Path, weight: float) -> tuple[str, list[dict]]:
    """A finished run's skills report rows for every experience at weight w, with the head-only control."""
    record, model, batches = load_run(run_dir)
    try:
        return record["run_id"], skills_report(model, batches, list(range(model.pool.num_tasks)), weight, True)
    except ValueError as exc:  # e.g. a composition coefficient of 0, whose head cannot be re-weighted
        raise ConfigError(f"{run_dir}: {exc}") from None


def add_table_parser(sub, report_args, sweep_options) -> None:
    """``bench skills-table PATH… --out DIR`` (``report_args`` adds the paths and options of ``bench aggregate``,
    ``sweep_options(args)`` reads them back)."""
    p = sub.add_parser(
        "skills-table",
        help="skills of every finished task-vector run under PATHs, with a head-only control: OUT/README.md + CSV",
    )
    report_args(p, "output folder for README.md and skills.csv (the previous generation's files are replaced)")
    p.add_argument("--weight", type=float, default=1.0, help="specialisation weight w of the target (default 1)")
    p.set_defaults(func=cmd_skills_table, sweep_options=sweep_options)


def cmd_skills_table(args: argparse.Namespace) -> int:
    from clcompose.bench.io import display_path
    from clcompose.bench.report.output import check_output
    from clcompose.bench.report.skills_table import write_skills_table

    if not 0.0 <= args.weight <= 1.0:
        raise ConfigError(f"--weight must be in [0, 1], got {args.weight}")
    out = check_output(args.out, args.overwrite_committed)
    written, table, skipped = write_skills_table(
        args.paths, out, compute_report, args.weight, **args.sweep_options(args)
    )
    for path, reason in skipped:
        print(f"bench: left out {path}: {reason}", file=sys.stderr)
    print(f"{table['variant'].nunique()} variants → {', '.join(display_path(p) for p in written)}")
    return 0
