"""The leaderboard's training method × composition rule table, on synthetic records with hand-chosen accuracies
whose means and 95 % intervals are worked out by hand below."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from clcompose.bench.perf.records import synthetic_record
from clcompose.bench.report.aggregate import load_results
from clcompose.bench.report.composition_table import composition_table, to_markdown, write_composition_tables
from clcompose.bench.report.leaderboard import build_leaderboard, write_aggregate
from clcompose.bench.runs.config import config_hash

# Student's t 0.975 quantiles in closed form: 1 degree of freedom (Cauchy) tan(π(p − 1/2)); 2 degrees of
# freedom (2p − 1)·√(2 / (4p(1 − p)))
P = 0.975
T1, T2 = math.tan(math.pi * (P - 0.5)), (2 * P - 1) * math.sqrt(2 / (4 * P * (1 - P)))

# (benchmark, strategy, strategy options, accuracy per seed)
CELLS = [
    ("split-fmnist", "ita", {"alpha": 0.1, "composition": "average"}, [0.80, 0.82, 0.84]),
    ("split-fmnist", "ita", {"alpha": 0.1, "composition": "sum"}, [0.70, 0.74]),
    ("split-fmnist", "ita", {"alpha": 0.1, "composition": "ties"}, [0.90]),
    ("split-fmnist", "ita", {"alpha": 0.5, "composition": "average"}, [0.50, 0.52, 0.54]),
    ("split-fmnist", "task-arithmetic", {"composition": "sum"}, [0.66, 0.66, 0.69]),
    ("split-fmnist", "task-arithmetic", {"composition": "average"}, [0.60, 0.62, 0.64]),
    ("split-fmnist", "naive", {}, [0.30, 0.31, 0.32]),  # no composition option: not in the table
    ("split-digits", "ita", {"alpha": 0.1, "composition": "average"}, [0.70, 0.72]),  # one rule only: no table
    ("split-digits", "naive", {}, [0.40, 0.41]),
]


@pytest.fixture()
def records(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "runs"
    for benchmark, strategy, options, accuracies in CELLS:
        for seed, acc in enumerate(accuracies):
            rec = synthetic_record(0, rng)
            rec["config"] |= {"benchmark": benchmark, "strategy": strategy, "strategy_options": options}
            rec["config"] |= {"seed": seed, "stream_seed": seed}
            rec["config_hash"] = config_hash(rec["config"])
            rec["run_id"] = f"{benchmark}_{strategy}_s{seed}_{rec['config_hash'][:10]}"
            rec["metrics"]["final_average_accuracy"] = acc
            path = folder / rec["run_id"] / "record.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(rec))
    return folder


def test_cells_are_mean_and_student_t_interval(records):
    table = composition_table(load_results([records]), "split-fmnist")
    got = {(r["label"], r["rule"]): r for r in table.to_dict("records")}
    assert set(got) == {
        ("ita (alpha=0.1)", "average"),
        ("ita (alpha=0.1)", "sum"),
        ("ita (alpha=0.1)", "ties"),
        ("ita (alpha=0.5)", "average"),
        ("task-arithmetic", "average"),
        ("task-arithmetic", "sum"),
    }
    # ita α=0.1 average: 0.80, 0.82, 0.84 → x̄ 0.82, s 0.02, half-width t(2)·0.02/√3
    cell = got[("ita (alpha=0.1)", "average")]
    assert cell["n_seeds"] == 3 and cell["mean"] == pytest.approx(0.82) and cell["std"] == pytest.approx(0.02)
    assert cell["ci95"] == pytest.approx(T2 * 0.02 / math.sqrt(3))
    # ita α=0.1 sum: 0.70, 0.74 → x̄ 0.72, s = 0.04/√2, half-width t(1)·s/√2 = t(1)·0.02
    cell = got[("ita (alpha=0.1)", "sum")]
    assert cell["n_seeds"] == 2 and cell["mean"] == pytest.approx(0.72) and cell["ci95"] == pytest.approx(T1 * 0.02)
    # one seed: no interval
    cell = got[("ita (alpha=0.1)", "ties")]
    assert cell["n_seeds"] == 1 and cell["mean"] == pytest.approx(0.90) and math.isnan(cell["ci95"])
    # task arithmetic sum: 0.66, 0.66, 0.69 → x̄ 0.67, s² = (0.01² + 0.01² + 0.02²)/2 = 0.0003
    cell = got[("task-arithmetic", "sum")]
    assert cell["mean"] == pytest.approx(0.67) and cell["ci95"] == pytest.approx(T2 * math.sqrt(0.0003 / 3))
    best = {k for k, r in got.items() if r["best"]}
    assert best == {("ita (alpha=0.1)", "ties"), ("ita (alpha=0.5)", "average"), ("task-arithmetic", "sum")}
    assert composition_table(load_results([records]), "split-digits") is None  # a single rule


def test_markdown_pivot_rows_methods_columns_rules(records):
    md = to_markdown(composition_table(load_results([records]), "split-fmnist"))
    lines = md.splitlines()
    assert lines[0] == "| Training method | `average` | `sum` | `ties` |"  # the option's order of rules
    assert lines[1] == "|:---|---:|---:|---:|"
    # 5.0 = t(2)·0.02/√3 in percent (4.97); 25.4 = t(1)·0.02 in percent; 4.3 = t(2)·√(0.0003/3) in percent
    assert lines[2:] == [
        "| ita (alpha=0.1) | 82.0 ± 5.0 (3) | 72.0 ± 25.4 (2) | **90.0 (1)** |",
        "| ita (alpha=0.5) | **52.0 ± 5.0 (3)** | – | – |",
        "| task-arithmetic | 62.0 ± 5.0 (3) | **67.0 ± 4.3 (3)** | – |",
    ]
    assert "naive" not in md


def test_exact_tie_bolds_every_best_rule(records):
    res = load_results([records])
    ta = res.runs["strategy"] == "task-arithmetic"
    res.runs.loc[ta, "final_average_accuracy"] = 0.5  # both rules now have mean 0.5
    rows = composition_table(res, "split-fmnist").query("strategy == 'task-arithmetic'")
    assert list(rows["best"]) == [True, True]


def test_leaderboard_page_and_tables(tmp_path, records):
    page, _ = build_leaderboard([str(records)], tmp_path / "out", plots=False)
    text = page.read_text()
    fmnist = text.split("## split-fmnist")[1].split("## ")[0]
    assert "**Training method × composition rule** ([CSV](tables/split-fmnist-composition.csv)" in fmnist
    assert "| task-arithmetic | 62.0 ± 5.0 (3) | **67.0 ± 4.3 (3)** | – |" in fmnist
    assert "composition rule" not in text.split("## split-digits")[1].split("## ")[0]
    tables = tmp_path / "out" / "tables"
    assert not (tables / "split-digits-composition.csv").exists()
    assert (tables / "split-fmnist-composition.md").read_text() in fmnist
    manifest = json.loads((tmp_path / "out" / ".bench-outputs.json").read_text())["files"]
    assert {"tables/split-fmnist-composition.csv", "tables/split-fmnist-composition.md"} <= set(manifest)
    csv = pd.read_csv(tables / "split-fmnist-composition.csv")
    assert list(csv["method"]) == ["ita (alpha=0.1)", "ita (alpha=0.5)", "task-arithmetic"]
    assert list(csv["best"]) == ["ties", "average", "sum"]
    ita = csv.iloc[0]
    assert ita["average_mean"] == pytest.approx(0.82) and ita["sum_ci95"] == pytest.approx(T1 * 0.02)
    assert ita["ties_n_seeds"] == 1 and math.isnan(ita["ties_ci95"])
    assert csv.iloc[1]["sum_n_seeds"] == 0 and math.isnan(csv.iloc[1]["sum_mean"])
    # bench aggregate writes them too, and a generation without the table removes the old one
    written, _ = write_aggregate([str(records)], tmp_path / "agg")
    assert tmp_path / "agg" / "tables" / "split-fmnist-composition.csv" in written
    digits = [p for p in records.iterdir() if p.name.startswith("split-digits")]
    write_aggregate([str(p) for p in digits], tmp_path / "agg")
    assert not (tmp_path / "agg" / "tables" / "split-fmnist-composition.csv").exists()


def test_written_only_with_two_rules(tmp_path, records):
    digits = [p for p in records.iterdir() if p.name.startswith("split-digits")]
    assert write_composition_tables(load_results(digits), tmp_path / "out") == []
