"""The paper's published numbers as targets: matched to finished cells, shown in the leaderboard, checked.

A target (``examples/paper/targets.yaml``) names a benchmark, a strategy, strategy options, a metric and its
published value in percent. It applies to a variant (a cell's config without its seeds) of that benchmark and
strategy whose strategy options include every ``options`` entry (numbers compared to 1e-9); of several
targets that apply, the one naming the most options wins. The check is one-sided, as in continual-learning
baselines' target tests: a variant fails when its mean over seeds is below ``value − margin``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from clcompose.strategies.core.registry import ConfigError

METRIC_SCALE = 100.0  # records hold fractions; the paper reports percent


@dataclasses.dataclass(frozen=True)
class Target:
    benchmark: str
    strategy: str
    options: dict[str, Any]
    metric: str
    value: float  # percent
    source: str
    row: str = ""

    def applies(self, config: dict[str, Any]) -> bool:
        if config.get("benchmark") != self.benchmark or config.get("strategy") != self.strategy:
            return False
        given = config.get("strategy_options") or {}
        return all(k in given and _same(given[k], v) for k, v in self.options.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def default_targets_path() -> Path:
    """``examples/paper/targets.yaml`` (installed as package data)."""
    from clcompose.bench.io import resource_dir

    return resource_dir("examples") / "paper" / "targets.yaml"


def load_targets(path: str | Path | None = None) -> list[Target]:
    from clcompose.bench.io import read_yaml_mapping

    path = Path(path) if path is not None else default_targets_path()
    data = read_yaml_mapping(path, "targets")
    out = []
    for i, t in enumerate(data.get("targets") or []):
        try:
            out.append(
                Target(
                    benchmark=str(t["benchmark"]),
                    strategy=str(t["strategy"]),
                    options=dict(t.get("options") or {}),
                    metric=str(t.get("metric", "final_average_accuracy")),
                    value=float(t["value"]),
                    source=str(t.get("source", "")),
                    row=str(t.get("row", "")),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: targets[{i}] is not a target ({type(exc).__name__}: {exc})") from None
    return out


def target_for(config: dict[str, Any], targets: list[Target]) -> Target | None:
    """The most specific target that applies to ``config`` (None when none does)."""
    applicable = [t for t in targets if t.applies(config)]
    return max(applicable, key=lambda t: len(t.options)) if applicable else None


def paper_rows(results, benchmark: str, targets: list[Target]) -> list[dict[str, Any]]:
    """Per variant of ``benchmark`` (summary-table order): label, n seeds, the measured mean (%), target, diff."""
    from clcompose.bench.report.aggregate import summary_table

    rows = []
    for r in summary_table(results, benchmark).to_dict("records"):
        target = target_for(results.variants[r["variant"]], targets)
        measured = None
        if target is not None:
            mean = r.get(f"{target.metric}_mean")
            measured = None if mean is None or mean != mean else mean * METRIC_SCALE
        rows.append(
            {
                "label": r["label"],
                "n_seeds": r["n_seeds"],
                "measured": measured,
                "target": target,
                "diff": None if measured is None else measured - target.value,
            }
        )
    return rows


def with_paper_columns(markdown: str, rows: list[dict[str, Any]]) -> str:
    """A summary table in markdown (:func:`~clcompose.bench.report.aggregate.to_markdown`, same row order) with a
    "Paper" and a "Δ paper" column; unchanged when no row has a target."""
    if not any(r["target"] is not None for r in rows):
        return markdown
    lines = markdown.rstrip("\n").split("\n")
    lines[0] += " Paper (%) | Δ paper |"
    lines[1] += "---:|---:|"
    for k, r in enumerate(rows):
        t = r["target"]
        paper = f"{t.value:.2f} ({t.source})" if t is not None else "–"
        diff = f"{r['diff']:+.1f}" if r["diff"] is not None else "–"
        lines[2 + k] += f" {paper} | {diff} |"
    return "\n".join(lines) + "\n"


def check(results, targets: list[Target], margin: float) -> tuple[list[str], list[str]]:
    """One line per variant that has a target; returns (all lines, failing lines)."""
    lines, failures = [], []
    for benchmark in results.benchmarks():
        for r in paper_rows(results, benchmark, targets):
            t = r["target"]
            if t is None or r["measured"] is None:
                continue
            ok = r["measured"] >= t.value - margin
            line = (
                f"{'ok  ' if ok else 'FAIL'} {benchmark} {r['label']}: {r['measured']:.2f} vs paper {t.value:.2f} "
                f"({t.source}, {t.row}; {r['diff']:+.2f}, margin {margin:g}, n={r['n_seeds']})"
            )
            lines.append(line)
            if not ok:
                failures.append(line)
    return lines, failures


def leaderboard_table(markdown: str, results, benchmark: str, targets: list[Target] | None = None) -> str:
    """What ``bench leaderboard`` shows for ``benchmark``: its summary table, with the paper's numbers where a
    target of ``examples/paper/targets.yaml`` (or ``targets``) applies."""
    targets = load_targets() if targets is None else targets
    return with_paper_columns(markdown, paper_rows(results, benchmark, targets))
