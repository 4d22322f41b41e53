"""Training method × composition rule: which training makes task vectors that every rule composes well.

The task-vector strategies (``ita``, ``iel``, ``task-arithmetic``, ``tmc``, ``magmax``, …) record a
``composition`` strategy option (``strategies/task_vectors/composition.py``). For a benchmark whose records hold
at least two distinct ``composition`` values, the runs of those strategies are pivoted:

* a row is a *training method*: a variant's config without its seeds and without ``strategy_options.composition``
  (the strategy and every other option, so ``ita (alpha=0.1)`` and ``ita (alpha=0.5)`` are two rows);
* a column is a composition rule (in the order of the option's values: average, sum, ties, magmax, fisher,
  tangent; unknown rules after them, sorted);
* a cell is the final average accuracy over the cell's n seeds: the mean x̄ = (1/n) Σ_i a_i ± the half-width of
  its 95 % confidence interval t_{0.975, n−1} · s / √n (s the sample standard deviation, Student's t; no interval
  for one seed), as :func:`~clcompose.bench.report.aggregate.ci95_halfwidth` computes it.

The best rule of a row is the one with the highest mean (bold on the page; every one of them on an exact tie).
Pure pandas over :class:`~clcompose.bench.report.aggregate.Results`; ``bench leaderboard`` and ``bench aggregate``
write ``tables/<benchmark>-composition.{csv,md}`` and the page shows the Markdown table under the benchmark's.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path

from clcompose.bench.io import write_csv_atomic, write_text_atomic
from clcompose.bench.report.aggregate import Results, ci95_halfwidth, variant_labels

OPTION = "composition"  # the strategy option that names the rule
METRIC = "final_average_accuracy"
SCALE, DECIMALS = 100.0, 1  # shown in percent, as the leaderboard's "Final acc. (%)"
SUFFIX = "-composition"  # tables/<benchmark>-composition.{csv,md}


def rule_order() -> tuple[str, ...]:
    """The composition rules in the order the option declares them (``TaskVectorOptions.composition``)."""
    from clcompose.strategies.task_vectors.options import TaskVectorOptions

    return typing.get_args(typing.get_type_hints(TaskVectorOptions)[OPTION])


def _ordered(rules) -> list[str]:
    known = rule_order()
    return [r for r in known if r in rules] + sorted(r for r in rules if r not in known)


def composition_runs(results: Results, benchmark: str):
    """The runs of ``benchmark`` whose strategy options have a ``composition``, with three more columns:
    ``method`` (a key of the config without seeds and rule), ``method_label`` and ``rule``."""
    runs = results.runs[results.runs["benchmark"] == benchmark]
    method_of, rule_of, methods = {}, {}, {}
    for variant in runs["variant"].unique():
        config = results.variants[variant]
        options = config.get("strategy_options")
        if not isinstance(options, dict) or OPTION not in options:
            continue
        method = config | {"strategy_options": {k: v for k, v in options.items() if k != OPTION}}
        key = hashlib.sha256(json.dumps(method, sort_keys=True).encode()).hexdigest()[:12]
        methods[key], method_of[variant], rule_of[variant] = method, key, str(options[OPTION])
    chosen = runs[runs["variant"].isin(method_of)]
    labels = variant_labels(methods)  # names what distinguishes the training methods from each other
    method = chosen["variant"].map(method_of)
    return chosen.assign(method=method, method_label=method.map(labels), rule=chosen["variant"].map(rule_of))


def composition_table(results: Results, benchmark: str):
    """One row per (training method, rule) of ``benchmark``: label, strategy, rule, n_seeds, mean, std, ci95 and
    best (the rule of highest mean in its method's row); None when fewer than two rules were recorded."""
    runs = composition_runs(results, benchmark)
    if runs["rule"].nunique() < 2:
        return None
    grouped = runs.groupby(["method", "rule"], sort=False)
    table = grouped[METRIC].agg(["mean", "std", "count"]).reset_index()
    table["ci95"] = [ci95_halfwidth(s, int(n)) for s, n in zip(table["std"], table["count"])]
    table = table.rename(columns={"count": "n_seeds"})
    firsts = grouped[["method_label", "strategy"]].first().reset_index()
    table = table.merge(firsts, on=["method", "rule"]).rename(columns={"method_label": "label"})
    table["best"] = table["mean"] == table.groupby("method")["mean"].transform("max")
    position = {r: k for k, r in enumerate(_ordered(set(table["rule"])))}
    table = table.assign(position=table["rule"].map(position)).sort_values(["label", "method", "position"])
    columns = ["method", "label", "strategy", "rule", "n_seeds", "mean", "std", "ci95", "best"]
    return table[columns].reset_index(drop=True)


def _rows(table) -> list[tuple[str, str, dict[str, dict]]]:
    """(method, label, {rule: cell record}) per training method, in the table's order."""
    rows: dict[str, tuple[str, dict[str, dict]]] = {}
    for r in table.to_dict("records"):
        rows.setdefault(r["method"], (r["label"], {}))[1][r["rule"]] = r
    return [(m, label, cells) for m, (label, cells) in rows.items()]


def cell_text(r: dict) -> str:
    """``mean ± ci95 (n)`` in percent; the interval left out for one seed; bold for the row's best rule."""
    text = f"{r['mean'] * SCALE:.{DECIMALS}f}"
    if r["ci95"] == r["ci95"]:
        text += f" ± {r['ci95'] * SCALE:.{DECIMALS}f}"
    text += f" ({r['n_seeds']})"
    return f"**{text}**" if r["best"] else text


def to_markdown(table) -> str:
    """The pivot: training methods as rows, composition rules as columns (``–`` where a rule was not run)."""
    rules = _ordered(set(table["rule"]))
    lines = [
        "| Training method | " + " | ".join(f"`{r}`" for r in rules) + " |",
        "|:---|" + "---:|" * len(rules),
    ]
    for _, label, cells in _rows(table):
        texts = [cell_text(cells[r]) if r in cells else "–" for r in rules]
        lines.append("| " + label.replace("|", "\\|") + " | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def to_wide(table):
    """The pivot as a frame for CSV: method (its label), strategy, best rule(s), then per rule its mean, 95 %
    half-width, standard deviation and n seeds (fractions, as the other tables' CSVs)."""
    import pandas as pd

    rules = _ordered(set(table["rule"]))
    records = []
    for _, label, cells in _rows(table):
        first = next(iter(cells.values()))
        row = {
            "method": label,
            "strategy": first["strategy"],
            "best": " ".join(r for r in rules if r in cells and cells[r]["best"]),
        }
        for rule in rules:
            c = cells.get(rule, {})
            row |= {f"{rule}_{k}": c.get(k, float("nan")) for k in ("mean", "ci95", "std")}
            row[f"{rule}_n_seeds"] = c.get("n_seeds", 0)
        records.append(row)
    return pd.DataFrame.from_records(records)


def table_paths(out: Path, benchmark: str) -> tuple[Path, Path]:
    base = Path(out) / "tables" / f"{benchmark}{SUFFIX}"
    return base.with_suffix(".csv"), base.with_suffix(".md")


def write_composition_tables(results: Results, out: Path) -> list[Path]:
    """``out/tables/<benchmark>-composition.{csv,md}`` for every benchmark with two or more rules recorded."""
    written = []
    for benchmark in results.benchmarks():
        table = composition_table(results, benchmark)
        if table is None:
            continue
        csv, md = table_paths(out, benchmark)
        csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(csv, to_wide(table))
        write_text_atomic(md, to_markdown(table))
        written += [csv, md]
    return written


def composition_section(results: Results, benchmark: str) -> list[str]:
    """The leaderboard page's lines for ``benchmark``'s pivot (none without two rules recorded)."""
    table = composition_table(results, benchmark)
    if table is None:
        return []
    csv, md = (p.as_posix() for p in table_paths(Path(), benchmark))
    return [
        f"**Training method × composition rule** ([CSV]({csv}) · [Markdown]({md})): final average accuracy (%) of "
        "the task-vector strategies, one row per training method (the strategy and its other options), one column "
        "per `composition` rule; mean over seeds ± the 95 % confidence half-width (Student's t; none for one seed) "
        "and (n seeds); the best rule of each row in bold.",
        "",
        to_markdown(table),
    ]
