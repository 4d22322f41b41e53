"""The result store's read side: tidy frames, tables (CSV, Markdown, LaTeX), plots and the leaderboard page,
with truncated, partial and duplicated record files skipped and reported."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.perf.records import synthetic_record, write_synthetic
from clcompose.bench.report.aggregate import (
    load_results,
    summary_table,
    to_latex,
    to_markdown,
    variant_labels,
)
from clcompose.bench.report.leaderboard import MARKER, build_leaderboard
from clcompose.strategies.core.registry import ConfigError


@pytest.fixture()
def store(tmp_path):
    """63 synthetic records (3 benchmarks × 7 strategies × 3 seeds), plus three bad files and a duplicate."""
    runs = write_synthetic(tmp_path / "runs", 63)
    good = sorted(runs.rglob("record.json"))
    (runs / "truncated").mkdir()
    (runs / "truncated" / "record.json").write_text(good[0].read_text()[:700])
    partial = json.loads(good[1].read_text())
    del partial["metrics"]["bwt"]
    (runs / "partial").mkdir()
    (runs / "partial" / "record.json").write_text(json.dumps(partial))
    (runs / "running").mkdir()
    (runs / "running" / "record.json").write_text(json.dumps(json.loads(good[2].read_text()) | {"status": "running"}))
    (runs / "copy").mkdir()
    shutil.copy(good[3], runs / "copy" / "record.json")
    (runs / ".submitit" / "x").mkdir(parents=True)  # scheduler folders are not searched
    (runs / ".submitit" / "x" / "record.json").write_text("{")
    return runs, good


def test_tidy_frames_and_skipped_files(store):
    runs, good = store
    res = load_results([runs])
    assert len(res.runs) == 63 and res.runs["config_hash"].is_unique
    reasons = dict((Path(p).parent.name, r) for p, r in res.skipped)
    assert len(reasons) == 4, res.skipped
    assert "not valid JSON (truncated or corrupted?)" in reasons.pop("truncated")
    assert "incomplete record" in reasons["partial"] and "'bwt'" in reasons.pop("partial")
    assert "status is 'running'" in reasons.pop("running")
    ((folder, reason),) = reasons.items()  # the copy, or the original when the copy was read first
    assert reason.startswith("duplicate of") and "copy" in folder + reason and "counted once" in reason
    joint = res.runs[res.runs["strategy"] == "joint"]
    assert joint["forgetting"].isna().all() and joint["final_average_accuracy"].notna().all()
    # long views: 5 steps per curve (joint has none), 5x5 or 1x5 matrices, diagnostics for ita/iel only
    assert set(res.curves.groupby("run_id").size()) == {5} and len(res.curves) == 5 * (63 - 9)
    assert len(res.matrices) == 25 * 54 + 5 * 9
    assert set(res.diagnostics.merge(res.runs, on="run_id")["strategy"]) == {"ita", "iel"}
    assert set(res.diagnostics["key"]) == {
        "jensen_gap",
        "fisher_spread",
        "tau_norm (mean)",
    }  # lists averaged, matrices and counts left out


def test_summary_table_is_mean_and_t_interval_over_seeds(store):
    runs, good = store
    res = load_results([runs])
    table = summary_table(res, "split-fmnist")
    assert len(table) == 7 and set(table["n_seeds"]) == {3} and set(table["seeds"]) == {"0 1 2"}
    assert list(table["final_average_accuracy_mean"]) == sorted(table["final_average_accuracy_mean"], reverse=True)
    recs = [json.loads(p.read_text()) for p in good]
    ewc = [r for r in recs if r["config"]["benchmark"] == "split-fmnist" and r["config"]["strategy"] == "ewc"]
    row = table[table["strategy"] == "ewc"].iloc[0]
    for metric in ("final_average_accuracy", "forgetting", "bwt"):
        values = [r["metrics"][metric] for r in ewc]
        assert row[f"{metric}_mean"] == pytest.approx(np.mean(values))
        assert row[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))
    md = to_markdown(table)
    line = next(row_line for row_line in md.splitlines() if row_line.startswith("| ewc |"))
    mean, sd = (
        100 * np.mean([r["metrics"]["final_average_accuracy"] for r in ewc]),
        100 * np.std([r["metrics"]["final_average_accuracy"] for r in ewc], ddof=1),
    )
    half = 4.302652729911275 * sd / np.sqrt(3)  # Student's t 0.975 quantile at 2 degrees of freedom (tables)
    assert row["final_average_accuracy_ci95"] == pytest.approx(half / 100)
    assert f"| 3 | {mean:.1f} ± {half:.1f} |" in line
    assert re.search(r"\| joint \| 3 \| [\d.]+ ± [\d.]+ \| – \| – \|", md)
    tex = to_latex(table, "split_fmnist & co")
    assert r"\toprule" in tex and r"task-arithmetic" in tex and r"split\_fmnist \& co" in tex and r"$\pm$" in tex
    assert tex.count(r"\\") == 7 + 1


def test_labels_name_what_varies():
    base = {
        "benchmark": "b",
        "backbone": "x",
        "strategy": "ewc",
        "strategy_options": {"ewc_lambda": 10.0, "mode": "separate"},
        "train": {"lr": 0.1},
        "backbone_options": {},
        "benchmark_options": {},
        "device": "cpu",
        "threads": 1,
    }
    variants = {
        "a": base,
        "b": base | {"strategy_options": {"ewc_lambda": 100.0, "mode": "separate"}},
        "c": base | {"strategy": "naive", "strategy_options": {}},
        "d": base | {"strategy": "naive", "strategy_options": {}, "train": {"lr": 0.01}},
    }
    # lr varies across the benchmark's variants: shown where it differs from the most common value (0.1)
    assert variant_labels(variants) == {
        "a": "ewc (ewc_lambda=10)",
        "b": "ewc (ewc_lambda=100)",
        "c": "naive",
        "d": "naive (lr=0.01)",
    }
    two_backbones = {f"{k}{i}": v | {"backbone": bb} for i, bb in enumerate("xy") for k, v in variants.items()}
    labels = variant_labels(two_backbones)  # no most common backbone: named on every row
    assert labels["c0"] == "naive (backbone=x)" and labels["d1"] == "naive (backbone=y, lr=0.01)", labels


def test_aggregate_command_writes_tables_and_reports_bad_files(store, tmp_path, capsys):
    runs, _ = store
    assert main(["aggregate", str(runs), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "63 records → 10 tables" in out
    assert "bench: skipped 4 unreadable record file(s):" in err and "truncated/record.json: not valid JSON" in err
    assert "duplicate of" in err
    tables = tmp_path / "out" / "tables"
    assert sorted(p.name for p in tables.iterdir()) == sorted(
        [f"{b}.{s}" for b in ("split-cifar100", "split-digits", "split-fmnist") for s in ("csv", "md", "tex")]
        + ["runs.csv"]
    )
    csv = pd.read_csv(tables / "split-digits.csv")
    assert len(csv) == 7 and {"final_average_accuracy_mean", "final_average_accuracy_std", "n_seeds", "variant"} <= set(
        csv.columns
    )
    assert len(pd.read_csv(tables / "runs.csv")) == 63


@pytest.mark.slow
def test_leaderboard_page_links_tables_and_plots(store, tmp_path):
    runs, _ = store
    out = tmp_path / "results"
    page, res = build_leaderboard([str(runs)], out)
    text = page.read_text()
    assert text.startswith(MARKER) and "63 runs" in text
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (out / link).is_file(), link
    for bench in ("split-cifar100", "split-digits", "split-fmnist"):
        assert f"## {bench}" in text
        figures = {p.name for p in (out / "plots" / bench).iterdir()}
        assert figures == {
            f"{f}.{e}"
            for f in ("final_accuracy", "accuracy_curve", "forgetting", "accuracy_matrix", "diagnostics")
            for e in ("png", "pdf")
        }
    assert "## Skipped files" in text and "truncated" in text
    assert (out / "plots" / "split-digits" / "final_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "plots" / "split-digits" / "final_accuracy.pdf").read_bytes()[:5] == b"%PDF-"


def some_records(tmp_path: Path, keep) -> Path:
    rng = np.random.default_rng(0)
    for i in range(63):
        rec = synthetic_record(i, rng)
        if keep(rec["config"]):
            path = tmp_path / "runs" / rec["run_id"] / "record.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
    return tmp_path / "runs"


def test_regenerating_gives_identical_files(tmp_path):
    runs = some_records(
        tmp_path, lambda c: c["benchmark"] == "split-digits" and c["strategy"] in ("naive", "ita", "joint")
    )
    out = tmp_path / "results"
    build_leaderboard([str(runs)], out)
    (out / "tables" / "stale.csv").write_text("from an earlier generation")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    build_leaderboard([str(runs)], out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(before) - set(after) == {Path("tables/stale.csv")}  # the previous generation is replaced, not merged
    assert [k for k in after if before[k] != after[k]] == []  # no timestamps or random jitter in the outputs


def test_no_diagnostics_no_diagnostics_plot_and_joint_only(tmp_path):
    runs = some_records(tmp_path, lambda c: c["benchmark"] == "split-fmnist" and c["strategy"] in ("naive", "joint"))
    page, res = build_leaderboard([str(runs)], tmp_path / "out")
    assert len(res.runs) == 6 and res.diagnostics.empty
    names = {p.stem for p in (tmp_path / "out" / "plots").rglob("*.png")}
    assert names == {"final_accuracy", "accuracy_curve", "forgetting", "accuracy_matrix"}
    only_joint = some_records(tmp_path / "j", lambda c: c["benchmark"] == "split-fmnist" and c["strategy"] == "joint")
    page, res = build_leaderboard([str(only_joint)], tmp_path / "out-j")
    names = {p.stem for p in (tmp_path / "out-j" / "plots").rglob("*.png")}
    assert names == {"final_accuracy", "accuracy_curve", "accuracy_matrix"}  # no forgetting is defined for joint


def test_extra_metrics_become_columns_a_plot_and_a_linked_figure(tmp_path):
    """Records with metrics beyond the standard ones (a benchmark's extra_metrics, a strategy's final_metrics)."""
    rng = np.random.default_rng(1)
    runs = tmp_path / "runs"
    for i in range(5):
        rec = synthetic_record(i * 21, rng)  # split-fmnist, naive, seeds 0..4
        rec["metrics"] |= {"ood_accuracy": 0.4 + 0.01 * i, "decode_r2": None if i == 0 else 0.5}
        (runs / rec["run_id"]).mkdir(parents=True)
        (runs / rec["run_id"] / "record.json").write_text(json.dumps(rec))
    page, res = build_leaderboard([str(runs)], tmp_path / "out")
    assert res.extra_metrics == ["ood_accuracy", "decode_r2"]
    table = summary_table(res, "split-fmnist")
    assert len(table) == 1 and table["ood_accuracy_mean"].iloc[0] == pytest.approx(
        np.mean([0.4 + 0.01 * i for i in range(5)])
    )
    assert table["decode_r2_mean"].iloc[0] == pytest.approx(0.5)  # a missing value is left out, not a zero
    text = page.read_text()
    assert "extra_metrics.png" in text and (tmp_path / "out" / "plots" / "split-fmnist" / "extra_metrics.png").is_file()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (tmp_path / "out" / link).is_file(), link


def test_empty_store_is_an_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="no result records found in .*runs; nothing written"):
        build_leaderboard([str(tmp_path / "runs")], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for verb in ("aggregate", "leaderboard"):
        assert main([verb, str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bench: error: no result records found"), err
    assert not (tmp_path / "out").exists()


def test_perf_command_reports_figures(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "clcompose.bench", "perf", "--records", "60", "--help-runs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"aggregate in process: read 60 records in [\d.]+ s", r.stdout), r.stdout
    assert re.search(r"`bench --help`: median [\d.]+ s", r.stdout), r.stdout


# --------------------------------------------------------------------------- issue 16: the output folder and sweep options


def _records_at_cells(tmp_path: Path) -> tuple[Path, Path]:
    """A sweep file whose cells ran with --runs-dir (synthetic records at the cells' record paths)."""
    from clcompose.bench.sweeps.sweep import load_sweep
    from tests.test_hardening import TINY

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(TINY + f"output: {tmp_path / 'default-output'}\n")
    runs = tmp_path / "elsewhere"
    rng = np.random.default_rng(0)
    for i, cell in enumerate(load_sweep(sweep_file, runs_dir=runs).cells):
        cell.run_dir.mkdir(parents=True)
        cell.record_path.write_text(json.dumps(synthetic_record(i, rng)))
    return sweep_file, runs


def test_aggregate_and_leaderboard_take_the_sweeps_runs_dir(tmp_path, capsys):
    sweep_file, runs = _records_at_cells(tmp_path)
    for verb in ("aggregate", "leaderboard"):
        out = tmp_path / f"out-{verb}"
        assert main([verb, str(sweep_file), "--out", str(out)]) == 2  # the file's own output holds nothing
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no result records found" in err[0] and "--runs-dir" in err[0], err
        assert not out.exists()
        extra = ["--no-plots"] if verb == "leaderboard" else []
        assert main([verb, str(sweep_file), "--out", str(out), "--runs-dir", str(runs), *extra]) == 0
        assert "2 records" in capsys.readouterr().out
        assert main([verb, str(sweep_file), "--out", str(out), "--runs-dir", str(runs), "--profile", "ci", *extra]) == 0
        capsys.readouterr()  # the CI profile runs the same cells (cpu, 1 thread)
        assert main([verb, str(sweep_file), "--out", str(out), "--runs-dir", str(runs), "--set", "train.epochs=3"]) == 2
        assert "no result records found" in capsys.readouterr().err  # other cells: not these records


def test_old_tables_do_not_pass_for_new_ones(tmp_path, capsys):
    both = some_records(tmp_path / "both", lambda c: c["benchmark"] in ("split-fmnist", "split-digits"))
    one = some_records(tmp_path / "one", lambda c: c["benchmark"] == "split-digits")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["aggregate", str(both), "--out", str(out)]) == 0
    assert (out / "tables" / "split-fmnist.md").is_file()
    assert main(["aggregate", str(one), "--out", str(out)]) == 0
    assert not (out / "tables" / "split-fmnist.md").exists() and (out / "tables" / "split-digits.md").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # files no generation of ours wrote are left alone
    build_leaderboard([str(both)], out, plots=False)
    assert (out / "README.md").is_file()
    assert main(["aggregate", str(one), "--out", str(out)]) == 0  # tables now: the leaderboard page is gone
    assert not (out / "README.md").exists() and not (out / "tables" / "split-fmnist.csv").exists()
    manifest = json.loads((out / ".bench-outputs.json").read_text())
    assert manifest["written_by"] == "bench aggregate" and "tables/split-digits.md" in manifest["files"]
    capsys.readouterr()


def test_the_committed_results_are_only_replaced_on_purpose(tmp_path, capsys):
    from clcompose.bench.report.output import check_output, committed_results

    runs = some_records(tmp_path, lambda c: c["benchmark"] == "split-digits")
    repo = Path(__file__).resolve().parent.parent
    before = {p: p.stat().st_mtime_ns for p in (repo / "results").rglob("*")}
    for target in (repo / "results", repo / "results" / "teacher", repo / "results" / "new"):
        for verb in ("aggregate", "leaderboard"):
            assert main([verb, str(runs), "--out", str(target)]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "is a committed leaderboard (results/)" in err[0], err
            assert "--overwrite-committed" in err[0]
        assert check_output(target, overwrite_committed=True) == target  # allowed when asked
    assert {p: p.stat().st_mtime_ns for p in (repo / "results").rglob("*")} == before
    assert not committed_results(tmp_path) and not committed_results(repo / "results-digits")
    from clcompose.bench.report.aggregate import load_results
    from clcompose.bench.report.leaderboard import render_page

    page = render_page(load_results([runs]), {}, repo / "results" / "teacher", ["examples/sweep-teacher.yaml"])
    assert "--out results/teacher --overwrite-committed`" in page
