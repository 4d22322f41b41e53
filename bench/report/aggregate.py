"""Result records → tidy pandas frames → per-benchmark tables (CSV, Markdown, LaTeX).

Records stay one JSON file per run. :func:`load_results` reads any number of them into

* ``runs``: one row per run (its config identity, seeds and scalar metrics),
* ``curves``: one row per (run, training step) with the average accuracy on the experiences seen so far,
* ``matrices``: one row per accuracy-matrix entry,
* ``diagnostics``: one row per (run, experience, numeric key) of ``strategy_extras.diagnostics``,

and lists the files it had to skip (truncated, corrupted, partial, or duplicates of a run already read).
Runs that differ only in their seeds form a *variant*; tables give the mean over its seeds ± the half-width of
the 95 % confidence interval of that mean (Student's t with n − 1 degrees of freedom: t·s/√n); the CSV also
keeps the standard deviation s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clcompose.bench.io import display_path, write_csv_atomic, write_text_atomic
from clcompose.bench.report.stats import ci95_halfwidth  # noqa: F401  (re-exported)
from clcompose.strategies.core.registry import ConfigError

# (column in `runs`, table header, display scale, decimals)
METRICS = (
    ("final_average_accuracy", "Final acc. (%)", 100.0, 1),
    ("forgetting", "Forgetting (%)", 100.0, 1),
    ("bwt", "BWT (%)", 100.0, 1),
    ("total_wall_s", "Wall time (s)", 1.0, 0),
)
SEED_KEYS = ("seed", "stream_seed")
STANDARD_METRICS = ("final_average_accuracy", "forgetting", "bwt", "accuracy_curve")
# Any other scalar in a record's ``metrics`` (e.g. a benchmark's extra_metrics) becomes a column of ``runs`` and
# of the tables of the benchmarks whose runs report it, shown as recorded with 3 decimals.
EXTRA_SCALE, EXTRA_DECIMALS = 1.0, 3


@dataclasses.dataclass
class Results:
    """Everything read from a set of records, plus the files that were skipped and why.

    ``runs`` is a frame; the per-step views are built on first use (tables do not need them).
    """

    runs: Any
    variants: dict[str, dict[str, Any]]  # variant key → config without seeds
    skipped: list[tuple[str, str]]
    raw_curves: dict[str, list] = dataclasses.field(default_factory=dict)  # run id → accuracy curve
    raw_matrices: dict[str, list] = dataclasses.field(default_factory=dict)  # run id → accuracy matrix
    raw_diagnostics: dict[str, list] = dataclasses.field(default_factory=dict)  # run id → [(experience, key, value)]
    extra_metrics: list[str] = dataclasses.field(default_factory=list)  # extra scalar metric columns, first seen first

    def benchmarks(self) -> list[str]:
        return sorted(self.runs["benchmark"].unique()) if len(self.runs) else []

    @functools.cached_property
    def curves(self):
        """run_id, step (experiences trained on), accuracy (average over the experiences seen)."""
        import pandas as pd

        rows = [(r, k + 1, _number(v)) for r, curve in self.raw_curves.items() for k, v in enumerate(curve)]
        return pd.DataFrame.from_records(rows, columns=["run_id", "step", "accuracy"])

    @functools.cached_property
    def matrices(self):
        """run_id, row (training step), col (evaluated experience), accuracy."""
        import pandas as pd

        rows = [
            (r, i, j, _number(v))
            for r, m in self.raw_matrices.items()
            for i, row in enumerate(m)
            for j, v in enumerate(row)
        ]
        return pd.DataFrame.from_records(rows, columns=["run_id", "row", "col", "accuracy"])

    @functools.cached_property
    def diagnostics(self):
        """run_id, experience, key, value: the numeric second-order diagnostics some strategies record."""
        import pandas as pd

        rows = [(r, *entry) for r, entries in self.raw_diagnostics.items() for entry in entries]
        return pd.DataFrame.from_records(rows, columns=["run_id", "experience", "key", "value"])


def find_record_files(paths: Iterable[str | Path], **sweep_options: Any) -> list[Path]:
    """Record files named by ``paths``: folders are searched for ``record.json``, sweep files give their cells'
    (expanded with ``load_sweep``'s ``profile``, ``runs_dir`` and ``overrides`` as ``bench sweep`` had them)."""
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.suffix in (".yaml", ".yml"):
            from clcompose.bench.sweeps.sweep import load_sweep

            sweep = load_sweep(path, **sweep_options)
            files += [c.record_path for c in sweep.cells if c.record_path.exists()]
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # not .submitit logs and pickles
                if "record.json" in names:
                    files.append(Path(root) / "record.json")
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{p} is neither a run folder, a record file nor a sweep file")
    return files


def _number(value: Any) -> float:
    """A metric value as float (NaN for None, which joint training has for forgetting and BWT)."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"not a number: {value!r}")
    return float(value)


DIAGNOSTIC_INDEX_KEYS = ("tasks", "experience", "step", "examples")  # positions and counts, not diagnostics


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _diagnostics(entries: list) -> list[tuple[int, str, float]]:
    """Per-experience diagnostic dicts → (experience number from 1, key, value) for every numeric value.

    A list of numbers (e.g. one norm per task vector) is summarised by its mean (key ``<name> (mean)``);
    nested lists (e.g. a cosine matrix) and missing values are left out.
    """
    rows = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        x = (
            entry["tasks"]
            if _is_number(entry.get("tasks"))
            else entry["experience"] + 1
            if _is_number(entry.get("experience"))
            else k + 1
        )
        for key, v in entry.items():
            if key in DIAGNOSTIC_INDEX_KEYS:
                continue
            if _is_number(v):
                rows.append((int(x), key, float(v)))
            elif isinstance(v, list) and v and all(_is_number(e) for e in v):
                rows.append((int(x), f"{key} (mean)", float(sum(v) / len(v))))
    return rows


def _parse(text: str, path: Path) -> dict[str, Any]:
    from clcompose.bench.runs.record import SCHEMA_VERSION

    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (truncated or corrupted?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(rec, dict) or rec.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"not a result record of schema {SCHEMA_VERSION}")
    if rec.get("status") != "complete":
        raise ValueError(f"status is {rec.get('status')!r}, not 'complete'")
    return rec


def load_results(paths: Iterable[str | Path], **sweep_options: Any) -> Results:
    """Read every record under ``paths`` (see :func:`find_record_files`); bad files are skipped and listed."""
    import pandas as pd

    runs = []
    curves: dict[str, list] = {}
    matrices: dict[str, list] = {}
    diagnostics: dict[str, list] = {}
    variants: dict[str, dict[str, Any]] = {}
    variant_of: dict[str, str] = {}  # canonical JSON of a config without seeds → variant key
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    extra_names: list[str] = []
    for path in find_record_files(paths, **sweep_options):
        try:
            rec = _parse(path.read_text(), path)
            cfg, m, timing = rec["config"], rec["metrics"], rec["timing"]
            run_id, digest = rec["run_id"], rec["config_hash"]
            row = {
                "run_id": run_id,
                "config_hash": digest,
                "benchmark": cfg["benchmark"],
                "backbone": cfg["backbone"],
                "strategy": cfg["strategy"],
                "seed": int(cfg["seed"]),
                "stream_seed": int(cfg["stream_seed"]),
                "n_experiences": int(rec["stream"]["n_experiences"]),
                "final_average_accuracy": _number(m["final_average_accuracy"]),
                "forgetting": _number(m["forgetting"]),
                "bwt": _number(m["bwt"]),
                "total_wall_s": _number(timing["total_wall_s"]),
                "total_cpu_s": _number(timing["total_cpu_s"]),
                "peak_memory_mb": _number(rec.get("peak_memory_mb")),
                "commit": ((rec.get("environment") or {}).get("git") or {}).get("commit"),
                "path": str(path),
            }
            matrix, curve = rec["accuracy_matrix"], m["accuracy_curve"] or []
            if (
                not isinstance(matrix, list)
                or not all(isinstance(r, list) for r in matrix)
                or not isinstance(curve, list)
            ):
                raise TypeError("accuracy_matrix or accuracy_curve is not a list")
            extra_metrics = {
                k: _number(v)
                for k, v in m.items()
                if k not in STANDARD_METRICS and k not in row and (v is None or _is_number(v))
            }
            extras = rec.get("strategy_extras") or {}
            diag = extras.get("diagnostics") if isinstance(extras, dict) else None
            run_diag = _diagnostics(diag) if isinstance(diag, list) else []
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) else f"incomplete record ({type(exc).__name__}: {exc})"
            skipped.append((str(path), reason))
            continue
        except OSError as exc:
            skipped.append((str(path), f"unreadable: {exc.strerror}"))
            continue
        if digest in seen:
            skipped.append((str(path), f"duplicate of {seen[digest]} (same run); counted once"))
            continue
        seen[digest] = str(path)
        canonical = json.dumps({k: v for k, v in cfg.items() if k not in SEED_KEYS}, sort_keys=True)
        key = variant_of.get(canonical)
        if key is None:
            key = variant_of[canonical] = hashlib.sha256(canonical.encode()).hexdigest()[:12]
            variants[key] = json.loads(canonical)
        row["variant"] = key
        runs.append(row | extra_metrics)
        extra_names.extend(k for k in extra_metrics if k not in extra_names)
        curves[run_id], matrices[run_id] = curve, matrix
        if run_diag:
            diagnostics[run_id] = run_diag

    runs_df = pd.DataFrame.from_records(
        runs, columns=None if runs else ["run_id", "benchmark", "variant", "strategy", "label"]
    )
    labels = variant_labels(variants)
    if len(runs_df):
        runs_df["label"] = runs_df["variant"].map(labels)
    return Results(
        runs=runs_df,
        variants=variants,
        skipped=skipped,
        raw_curves=curves,
        raw_matrices=matrices,
        raw_diagnostics=diagnostics,
        extra_metrics=extra_names,
    )


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": json.dumps(v, sort_keys=True) for k, v in value.items()}
        else:
            out[key] = json.dumps(value, sort_keys=True)
    return out


def _short(value: str) -> str:
    v = json.loads(value)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def variant_labels(variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Readable row names: the strategy, plus what distinguishes variants within their benchmark.

    Settings that vary across a benchmark's variants outside the strategy's own options (backbone, training,
    stream) are shown on the rows that differ from the most common value (on every row when there is no single
    most common value); a strategy's own options only where that strategy has several variants.
    """
    from collections import Counter

    labels: dict[str, str] = {}
    by_benchmark: dict[str, list[str]] = {}
    for key, cfg in variants.items():
        by_benchmark.setdefault(cfg["benchmark"], []).append(key)
    for keys in by_benchmark.values():
        flat = {k: _flatten(variants[k]) for k in keys}
        names = set().union(*(f.keys() for f in flat.values()))
        shared = sorted(n for n in names if not n.startswith("strategy") and len({flat[k].get(n) for k in keys}) > 1)
        by_strategy: dict[str, list[str]] = {}
        for key in keys:
            by_strategy.setdefault(variants[key]["strategy"], []).append(key)
        usual = {}  # shared setting → its most common value, when one value is the most common
        for n in shared:
            (first, c1), *rest = Counter(flat[k].get(n) for k in keys).most_common(2)
            if not rest or c1 > rest[0][1]:
                usual[n] = first
        for strategy, same in by_strategy.items():
            own_names = set().union(*(flat[k].keys() for k in same))
            own = sorted(
                n for n in own_names if n.startswith("strategy_options.") and len({flat[k].get(n) for k in same}) > 1
            )
            for key in same:
                shown = [n for n in shared if n in flat[key] and (n not in usual or flat[key][n] != usual[n])] + own
                parts = [f"{n.rsplit('.', 1)[-1]}={_short(flat[key][n])}" for n in shown if n in flat[key]]
                labels[key] = strategy + (f" ({', '.join(parts)})" if parts else "")
    return labels


def summary_table(results: Results, benchmark: str):
    """Per variant of ``benchmark``: n seeds, seeds, and mean/std of every metric; sorted by final accuracy."""
    runs = results.runs[results.runs["benchmark"] == benchmark]
    metric_cols = [m[0] for m in METRICS] + [k for k in results.extra_metrics if runs[k].notna().any()]
    grouped = runs.groupby("variant", sort=False)
    table = grouped[metric_cols].agg(["mean", "std", "count"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    for metric in metric_cols:
        count = table.pop(f"{metric}_count")
        table[f"{metric}_ci95"] = [ci95_halfwidth(s, int(n)) for s, n in zip(table[f"{metric}_std"], count)]
    table.insert(0, "seeds", grouped["seed"].agg(lambda s: " ".join(map(str, sorted(s)))))
    table.insert(0, "n_seeds", grouped.size())
    table.insert(0, "backbone", grouped["backbone"].first())
    table.insert(0, "strategy", grouped["strategy"].first())
    table.insert(0, "label", grouped["label"].first())
    table = table.sort_values(["final_average_accuracy_mean", "label"], ascending=[False, True])
    return table.reset_index()


def _cell(mean: float, std: float, n: int, scale: float, decimals: int, pm: str) -> str:
    if mean != mean:  # NaN: not defined for this strategy (joint has no forgetting)
        return "–"
    text = f"{mean * scale:.{decimals}f}"
    if n > 1 and std == std:
        text += f" {pm} {std * scale:.{decimals}f}"
    return text


def table_metrics(table) -> list[tuple[str, str, float, int]]:
    """The metric columns of a summary table: the standard ones, then its extra metrics."""
    standard = {m[0] for m in METRICS}
    extra = [c[: -len("_mean")] for c in table.columns if c.endswith("_mean") and c[: -len("_mean")] not in standard]
    return list(METRICS) + [(k, k, EXTRA_SCALE, EXTRA_DECIMALS) for k in extra]


def to_markdown(table) -> str:
    metrics = table_metrics(table)
    header = ["Strategy", "n"] + [m[1] for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * len(metrics)) + "|"]
    for r in table.to_dict("records"):
        cells = [r["label"].replace("|", "\\|"), str(r["n_seeds"])]
        cells += [_cell(r[f"{m}_mean"], r[f"{m}_ci95"], r["n_seeds"], scale, dec, "±") for m, _, scale, dec in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("$", r"\$"),
        ("#", r"\#"),
        ("_", r"\_"),
        ("{", r"\{"),
        ("}", r"\}"),
        ("~", r"\textasciitilde{}"),
        ("^", r"\textasciicircum{}"),
    ):
        text = text.replace(a, b)
    return text


def to_latex(table, caption: str) -> str:
    """A booktabs table (``\\usepackage{booktabs}``)."""
    metrics = table_metrics(table)
    header = ["Strategy", "$n$"] + [_latex_escape(m[1]) for m in metrics]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{_latex_escape(caption)}}}",
        r"\begin{tabular}{l" + "r" * (1 + len(metrics)) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for r in table.to_dict("records"):
        cells = [_latex_escape(r["label"]), str(r["n_seeds"])]
        cells += [
            _cell(r[f"{m}_mean"], r[f"{m}_ci95"], r["n_seeds"], scale, dec, r"$\pm$").replace("–", "--")
            for m, _, scale, dec in metrics
        ]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(results: Results, out: Path) -> list[Path]:
    """``out/tables/<benchmark>.{csv,md,tex}`` for every benchmark, and ``out/tables/runs.csv`` (one row per run)."""
    folder = Path(out) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for benchmark in results.benchmarks():
        table = summary_table(results, benchmark)
        base = folder / benchmark
        write_csv_atomic(base.with_suffix(".csv"), table.drop(columns=["variant"]).rename(columns={"label": "variant"}))
        write_text_atomic(base.with_suffix(".md"), to_markdown(table))
        caption = f"{benchmark}: mean over seeds ± 95 % confidence half-width (Student's t; n seeds per row)."
        write_text_atomic(base.with_suffix(".tex"), to_latex(table, caption))
        written += [base.with_suffix(s) for s in (".csv", ".md", ".tex")]
    if len(results.runs):
        cols = [
            "run_id",
            "benchmark",
            "backbone",
            "strategy",
            "label",
            "seed",
            "stream_seed",
            "n_experiences",
            "final_average_accuracy",
            "forgetting",
            "bwt",
            "total_wall_s",
            "total_cpu_s",
            "peak_memory_mb",
            "config_hash",
            "commit",
            "path",
        ] + results.extra_metrics
        runs = results.runs.sort_values(["benchmark", "label", "seed"])[cols]
        runs = runs.assign(path=runs["path"].map(display_path))  # the tables may be committed: no home folders in them
        write_csv_atomic(folder / "runs.csv", runs)
        written.append(folder / "runs.csv")
    return written
