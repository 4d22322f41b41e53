"""Controlled comparisons on the leaderboard page: what one row adds over another, paired by seed.

A sweep file may list pairs of its strategy entries to compare::

    compare:
      - [ita, linear-probe]        # what ITA's task vectors and regulariser add over the θ0 probe, same heads
      - [ita, ita@alpha0]          # what the second-order regulariser adds

Rows of one sweep share seeds, and a seed fixes the class order and the data subsample, so the difference
A − B is taken per seed and summarised as its mean ± the Student-t 95 % half-width over the common seeds
(a paired comparison). The verdict is *higher* or *lower* when that interval excludes 0, otherwise *no
measurable difference* — generated from the numbers, whichever way they come out. The same rows are written
to ``tables/<benchmark>-comparisons.csv`` and the sweep's tuning provenance (:mod:`..sweeps.select`) to the page.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from clcompose.bench.io import read_json, write_csv_atomic
from clcompose.bench.report.aggregate import SEED_KEYS, Results, ci95_halfwidth
from clcompose.strategies.core.registry import ConfigError


def check_compare(data: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The validated ``compare:`` pairs of a sweep file (entries must exist in its strategies)."""
    pairs = data.get("compare") or []
    entries = set((data.get("strategies") or {}) if isinstance(data.get("strategies"), dict) else [])
    if not isinstance(pairs, list):
        raise ConfigError(f"{where}: compare must be a list of [entry, entry] pairs, got {pairs!r}")
    out = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ConfigError(f"{where}: compare: each item must be a pair [entry, entry], got {pair!r}")
        unknown = [p for p in pair if p not in entries]
        if unknown:
            raise ConfigError(f"{where}: compare: {unknown[0]!r} is not an entry of strategies")
        out.append((pair[0], pair[1]))
    return out


def _variant_key(config: dict[str, Any]) -> str:
    import hashlib

    canonical = json.dumps({k: v for k, v in config.items() if k not in SEED_KEYS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def entry_variants(sweep) -> dict[str, set[str]]:
    """Per strategies entry of a sweep, the variant keys (as :func:`~.aggregate.load_results` names them) of
    its finished cells."""
    out: dict[str, set[str]] = {}
    for cell in sweep.cells:
        record = read_json(cell.record_path) if cell.record_path.is_file() else None
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            out.setdefault(cell.entry, set()).add(_variant_key(record["config"]))
    return out


def paired_difference(results: Results, benchmark: str, a: set[str], b: set[str]) -> dict[str, Any] | None:
    """Mean ± 95 % half-width of (A − B) in final average accuracy over the seeds both have (None: no seed)."""
    runs = results.runs[results.runs["benchmark"] == benchmark]
    va = runs[runs["variant"].isin(a)].groupby("seed")["final_average_accuracy"].mean()
    vb = runs[runs["variant"].isin(b)].groupby("seed")["final_average_accuracy"].mean()
    seeds = sorted(set(va.index) & set(vb.index))
    if not seeds:
        return None
    diffs = [float(va[s] - vb[s]) for s in seeds]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else float("nan")
    half = ci95_halfwidth(sd, len(diffs))
    if half != half:
        verdict = "one seed: no interval"
    elif mean - half > 0:
        verdict = "higher"
    elif mean + half < 0:
        verdict = "lower"
    else:
        verdict = "no measurable difference"
    return {"mean": mean, "ci95": half, "n_seeds": len(seeds), "verdict": verdict, "per_seed": diffs}


def comparison_rows(results: Results, benchmark: str, sweep, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    variants = entry_variants(sweep)
    labels = results.runs.drop_duplicates("variant").set_index("variant")["label"].to_dict()
    rows = []
    for a, b in pairs:
        va, vb = variants.get(a, set()), variants.get(b, set())
        diff = paired_difference(results, benchmark, va, vb) if va and vb else None
        if diff is not None:
            label_a = "; ".join(sorted(labels.get(v, v) for v in va))  # labels themselves hold ", "
            label_b = "; ".join(sorted(labels.get(v, v) for v in vb))
            rows.append({"a": a, "b": b, "label_a": label_a, "label_b": label_b} | diff)
    return rows


def comparison_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "**Controlled comparisons** (final average accuracy, A − B per seed, mean ± 95 % half-width over the common "
        "seeds; a verdict only when the interval excludes 0):",
        "",
        "| A | B | A − B (points) | n | verdict |",
        "|:---|:---|---:|---:|:---|",
    ]
    for r in rows:
        diff = f"{100 * r['mean']:+.1f}" + (f" ± {100 * r['ci95']:.1f}" if r["ci95"] == r["ci95"] else "")
        lines.append(f"| `{r['a']}` | `{r['b']}` | {diff} | {r['n_seeds']} | {r['verdict']} |")
    return lines + [""]


def write_comparisons(rows: list[dict[str, Any]], path: Path) -> Path:
    import pandas as pd

    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "per_seed"} for r in rows])
    return write_csv_atomic(path, frame)
