"""``bench skills-table``: unlearning and specialisation over many finished task-vector runs, with a head-only control.

For every finished ITA / IEL / task-arithmetic run under the paths, the skills report of ``bench skills`` (every
experience as target, specialisation weight w, head-only control on) is reused from the run folder or computed
and saved there. Per strategy variant (the leaderboard's labels) and edit, the table gives the target
experience's class-IL accuracy and the other experiences' accuracy as mean ± the Student-t 95 % half-width
t·s/√n over the n (seed, target) pairs, and the change Δ = acc(edit) − acc(composed) paired by (seed, target),
also as mean ± half-width. Each edit is applied once to the task vectors (c → c') and once to the heads only
(head s's logits scaled by c'_s / c_s, a head with c'_s = 0 masked; see
:mod:`clcompose.strategies.task_vectors.skills`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clcompose.bench.io import display_path, write_csv_atomic, write_text_atomic
from clcompose.bench.report.stats import ci95_halfwidth
from clcompose.strategies.core.registry import ConfigError

TASK_VECTOR_STRATEGIES = ("ita", "iel", "task-arithmetic")
EDITS = ("composed", "unlearn_drop", "unlearn_negate", "specialize")
SIDES = ("task_vectors", "heads")
METRICS = ("acc_target", "acc_rest", "acc_target_own_classes")


def edit_label(edit: str, weight: float) -> str:
    return {
        "composed": "composed",
        "unlearn_drop": "drop τ_target",
        "unlearn_negate": "negate τ_target",
        "specialize": f"specialise w={weight:g}",
    }[edit]


def report_covers(report: Any, run_id: str, n_experiences: int, weight: float) -> bool:
    """Whether a saved skills report is this run's, for every experience, at weight w, with the head control."""
    if not isinstance(report, dict) or report.get("run_id") != run_id or not report.get("head_control"):
        return False
    if report.get("weight") != weight or not isinstance(report.get("rows"), list):
        return False
    seen = {(r.get("target"), r.get("edit"), r.get("applied_to")) for r in report["rows"] if isinstance(r, dict)}
    need = {(k, e, "task_vectors") for k in range(n_experiences) for e in EDITS}
    need |= {(k, e, "heads") for k in range(n_experiences) for e in EDITS[1:]}
    return need <= seen


Compute = Callable[[Path, float], tuple[str, list[dict]]]  # (run folder, w) → (run id, report rows)


def run_report(run_dir: Path, run_id: str, n_experiences: int, weight: float, compute: Compute) -> tuple[dict, str]:
    """The run's skills report (reused from RUN_DIR/skills.json or skills-w<w>.json, else computed by ``compute``
    and saved to the first of them that does not exist; existing reports are never overwritten) and what was
    done."""
    from clcompose.bench.io import utc_now, write_json_atomic

    candidates = [run_dir / "skills.json", run_dir / f"skills-w{weight:g}.json"]
    for path in candidates:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if report_covers(report, run_id, n_experiences, weight):
            return report, f"reused {display_path(path)}"
    computed_id, rows = compute(run_dir, weight)
    report = {"run_id": computed_id, "created": utc_now(), "weight": weight, "head_control": True, "rows": rows}
    free = [p for p in candidates if not p.exists()]
    if not free:
        return report, "computed (not saved: both report files exist for other settings)"
    write_json_atomic(free[0], report)
    return report, f"computed → {display_path(free[0])}"


def collect(
    results, weight: float, compute: Compute, log: Callable[[str], None] = print
) -> tuple[Any, list[tuple[str, str]]]:
    """One row per (run, target, edit, side) with the accuracies and their change vs the composed model."""
    import pandas as pd

    runs = results.runs[results.runs["strategy"].isin(TASK_VECTOR_STRATEGIES)] if len(results.runs) else results.runs
    rows, skipped = [], []
    for run in runs.sort_values(["benchmark", "label", "seed"]).to_dict("records"):
        run_dir = Path(run["path"]).parent
        try:
            report, how = run_report(run_dir, run["run_id"], int(run["n_experiences"]), weight, compute)
        except ConfigError as exc:
            skipped.append((display_path(run_dir), str(exc)))
            continue
        log(f"{run['label']} seed {run['seed']}: {how}")
        by_key = {(r["target"], r["edit"], r.get("applied_to", "task_vectors")): r for r in report["rows"]}
        for k in range(int(run["n_experiences"])):
            composed = by_key[(k, "composed", "task_vectors")]
            for side in SIDES:
                for edit in EDITS:
                    r = composed if edit == "composed" else by_key[(k, edit, side)]
                    row = {key: run[key] for key in ("benchmark", "label", "strategy", "seed", "run_id")}
                    row |= {"target": k, "edit": edit, "applied_to": side}
                    for m in METRICS:
                        row[m] = _nan(r[m])
                        row[f"{m}_delta"] = _nan(r[m]) - _nan(composed[m])
                    rows.append(row)
    columns = ["benchmark", "label", "strategy", "seed", "run_id", "target", "edit", "applied_to"]
    columns += [c for m in METRICS for c in (m, f"{m}_delta")]
    return pd.DataFrame.from_records(rows, columns=columns), skipped


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def summarise(pairs):
    """Per (benchmark, variant, side, edit): n pairs, seeds, and mean / std / 95 % half-width of every metric and
    of its change vs composed."""
    import pandas as pd

    out = []
    for (benchmark, label, side, edit), g in pairs.groupby(["benchmark", "label", "applied_to", "edit"], sort=False):
        row = {"benchmark": benchmark, "variant": label, "strategy": g["strategy"].iloc[0], "applied_to": side}
        row |= {"edit": edit, "n": len(g), "seeds": " ".join(map(str, sorted(g["seed"].unique())))}
        for col in [c for m in METRICS for c in (m, f"{m}_delta")]:
            values = g[col].dropna()
            std = float(values.std()) if len(values) > 1 else float("nan")
            row |= {f"{col}_mean": float(values.mean()) if len(values) else float("nan"), f"{col}_std": std}
            row[f"{col}_ci95"] = ci95_halfwidth(std, len(values))
        out.append(row)
    table = pd.DataFrame.from_records(out)
    if not len(table):
        return table
    order = {e: i for i, e in enumerate(EDITS)}
    table["_edit"] = table["edit"].map(order)
    return table.sort_values(["benchmark", "variant", "applied_to", "_edit"]).drop(columns="_edit")


def _pct(mean: float, ci: float, signed: bool = False) -> str:
    if mean != mean:
        return "–"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    return text + (f" ± {ci * 100:.1f}" if ci == ci else "")


def to_markdown(table, weight: float, command: str, skipped: list[tuple[str, str]]) -> str:
    """The page: definitions, then per benchmark one row per (variant, edit) with both sides side by side."""
    lines = [
        "# Editing skills: task vectors vs heads",
        "",
        f"Generated by `{command}`. Class-IL accuracy (%, argmax over every class seen) of the target experience",
        "and of the other experiences, mean ± Student-t 95 % half-width over the n (seed, target) pairs (every",
        "experience of every seed is a target once; pairs of one seed share a model, so the interval is",
        "optimistic); Δ is the change vs *composed*, paired by (seed, target).",
        "",
        "- **Task vectors**: the run's composition θ0 + Σ_s c_s τ_s with c edited: *drop* c_target = 0, *negate*",
        f"  c_target = −c_target, *specialise* c_target = w·S and the others (1 − w)·S/(T − 1) (S = Σ c, w = {weight:g}).",
        "- **Heads only (control)**: the backbone stays at the unedited composition and the same edit c → c' is",
        "  applied to the heads: head s's weights and bias are scaled by c'_s / c_s, and a head with c'_s = 0 is",
        "  masked (its classes' logits set to the mask value −1e4, so they are never predicted). *Drop* masks the",
        "  target's head (its accuracy is 0 by construction), *negate* flips the sign of its logits, *specialise*",
        "  w = 1 masks every other head. The control shows how much of an edit the heads alone do.",
    ]
    for benchmark, t in table.groupby("benchmark", sort=False):
        lines += ["", f"## {benchmark}", ""]
        lines += [
            "| Variant | Edit | n | τ: target | τ: Δ target | τ: rest | τ: Δ rest "
            "| heads: target | heads: Δ target | heads: rest | heads: Δ rest |",
            "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (label, edit), g in t.groupby(["variant", "edit"], sort=False):
            sides = {r["applied_to"]: r for r in g.to_dict("records")}
            cells = [label.replace("|", "\\|"), edit_label(edit, weight), str(sides["task_vectors"]["n"])]
            for side in SIDES:
                r = sides[side]
                for m in ("acc_target", "acc_rest"):
                    cells.append(_pct(r[f"{m}_mean"], r[f"{m}_ci95"]))
                    cells.append("" if edit == "composed" else _pct(r[f"{m}_delta_mean"], r[f"{m}_delta_ci95"], True))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`skills.csv`: the same rows with standard deviations, and the target's accuracy within its own"]
    lines += ["classes (task-aware, `acc_target_own_classes`). Each run's report: `skills.json` in its folder."]
    if skipped:
        lines += ["", "Runs left out:", ""] + [f"- `{path}`: {reason}" for path, reason in skipped]
    return "\n".join(lines) + "\n"


def write_skills_table(
    paths: list[str],
    out: Path,
    compute: Compute,
    weight: float = 1.0,
    log: Callable[[str], None] = print,
    **sweep_options: Any,
) -> tuple[list[Path], Any, list[tuple[str, str]]]:
    """``bench skills-table``: OUT/README.md and OUT/skills.csv (the previous generation's files are replaced);
    ``compute`` makes a run's report where none is saved (``bench.cli.skills.compute_report``)."""
    from clcompose.bench.report.aggregate import load_results
    from clcompose.bench.report.output import remove_previous, require_records, write_manifest

    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--weight must be in [0, 1], got {weight}")
    results = load_results(paths, **sweep_options)
    require_records(results, [display_path(p) for p in paths])
    for path, reason in results.skipped:
        print(f"bench: skipped {path}: {reason}", file=sys.stderr)
    pairs, skipped = collect(results, weight, compute, log)
    if not len(pairs):
        left = f"; left out: {'; '.join(f'{p}: {r}' for p, r in skipped)}" if skipped else ""
        raise ConfigError(f"no finished ITA, IEL or task-arithmetic run in {', '.join(map(str, paths))}{left}")
    table = summarise(pairs)
    out = Path(out)
    remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    command = "bench skills-table " + " ".join(map(str, paths)) + f" --weight {weight:g}"
    write_text_atomic(out / "README.md", to_markdown(table, weight, command, skipped))
    write_csv_atomic(out / "skills.csv", table)
    written = [out / "README.md", out / "skills.csv"]
    write_manifest(out, written, "bench skills-table")
    return written, table, skipped
