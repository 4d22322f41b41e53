"""The skills table: head-only edits by hand, and the table's numbers against the runs' reports averaged by hand."""

import csv
import json
import math
import statistics

import pytest
import torch

from clcompose.bench.runs.run import run
from clcompose.strategies.core.heads import MASK_VALUE
from clcompose.strategies.task_vectors.skills import edit_head_logits, head_scales
from tests.test_ita_iel import config


def test_head_scales_are_the_edit_over_the_composition():
    c = [0.25, 0.25, 0.25, 0.25]
    assert head_scales(c, [0.25, 0.0, 0.25, 0.25]) == [1.0, 0.0, 1.0, 1.0]  # drop: head removed
    assert head_scales(c, [0.25, -0.25, 0.25, 0.25]) == [1.0, -1.0, 1.0, 1.0]  # negate: sign flipped
    assert head_scales(c, [0.0, 0.0, 1.0, 0.0]) == [0.0, 0.0, 4.0, 0.0]  # specialise w = 1
    assert head_scales([0.6, 0.6], [0.9, 0.3]) == pytest.approx([1.5, 0.5])
    assert head_scales([0.0, 1.0], [0.0, 0.0]) == [1.0, 0.0]  # an unedited coefficient leaves its head alone
    with pytest.raises(ValueError, match="coefficient 0"):
        head_scales([0.0, 1.0], [0.5, 1.0])


def test_head_edit_scales_or_masks_each_heads_columns():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [-1.0, 0.5, 2.0, -3.0, 7.0]])
    heads = [[2, 0], [1, 3]]  # column 4 belongs to no head (stays as it is)
    out = edit_head_logits(logits, heads, [0.0, -2.0])
    m = MASK_VALUE
    expected = torch.tensor([[m, -4.0, m, -8.0, 5.0], [m, -1.0, m, 6.0, 7.0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(edit_head_logits(logits, heads, [1.0, 1.0]), logits)
    out = edit_head_logits(logits, heads, [3.0, 0.0])
    torch.testing.assert_close(out, torch.tensor([[3.0, m, 9.0, m, 5.0], [-3.0, m, 6.0, m, 7.0]]))
    with pytest.raises(ValueError):
        edit_head_logits(logits, heads, [1.0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("skills-table")
    for seed in (0, 1):
        run(config("ita") | {"seed": seed}, runs_dir=folder / "runs", progress=False)
    return folder


def _reports(root):
    return [json.loads(p.read_text()) for p in sorted((root / "runs").glob("*/skills.json"))]


def _stats(values):
    """Mean and Student-t 95 % half-width t_{0.975, n-1}·s/√n, written out."""
    from scipy.stats import t

    n = len(values)
    return statistics.mean(values), t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)


def test_table_numbers_are_the_reports_averaged_by_hand(runs, capsys):
    from clcompose.bench.cli.main import main

    out = runs / "table"
    assert main(["skills-table", str(runs / "runs"), "--out", str(out)]) == 0
    assert "computed →" in capsys.readouterr().out
    reports = _reports(runs)
    assert len(reports) == 2 and all(r["head_control"] and r["weight"] == 1.0 for r in reports)
    with (out / "skills.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {r["variant"] for r in table} == {"ita"}
    assert len(table) == 8  # 4 edits × (task vectors, heads)

    def value(rep, target, edit, side, key):
        side = "task_vectors" if edit == "composed" else side
        (row,) = [r for r in rep["rows"] if (r["target"], r["edit"], r["applied_to"]) == (target, edit, side)]
        return row[key]

    for row in table:
        for key in ("acc_target", "acc_rest"):
            pairs = [(rep, k) for rep in reports for k in range(3)]
            values = [value(rep, k, row["edit"], row["applied_to"], key) for rep, k in pairs]
            deltas = [v - value(rep, k, "composed", "", key) for v, (rep, k) in zip(values, pairs)]
            mean, half = _stats(values)
            assert int(row["n"]) == 6
            assert float(row[f"{key}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(row[f"{key}_ci95"]) == pytest.approx(half, abs=1e-12)
            d_mean, d_half = _stats(deltas)
            assert float(row[f"{key}_delta_mean"]) == pytest.approx(d_mean, abs=1e-12)
            assert float(row[f"{key}_delta_ci95"]) == pytest.approx(d_half, abs=1e-12)
    page = (out / "README.md").read_text()
    assert "Heads only (control)" in page and "| ita | drop τ_target | 6 |" in page

    # a second table reuses the saved reports and leaves them as they were
    before = [p.stat().st_mtime_ns for p in sorted((runs / "runs").glob("*/skills.json"))]
    assert main(["skills-table", str(runs / "runs"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("reused") == 2
    assert [p.stat().st_mtime_ns for p in sorted((runs / "runs").glob("*/skills.json"))] == before


def test_head_only_edits_by_hand(runs):
    """Drop masks every class of the target: class-IL accuracy 0. Specialise w = 1 masks every other head: the
    rest scores 0 and the target scores its own-classes accuracy. Negate equals flipping the head's parameters."""
    from clcompose.bench.cli.skills import load_run, skills_report

    run_dir = sorted((runs / "runs").glob("*ita*"))[0]
    _, model, batches = load_run(run_dir)
    rows = skills_report(model, batches, [0, 1, 2], 1.0, head_control=True)

    def get(k, edit, side):
        (r,) = [r for r in rows if (r["target"], r["edit"], r["applied_to"]) == (k, edit, side)]
        return r

    for k in range(3):
        assert get(k, "unlearn_drop", "heads")["acc_target"] == 0.0
        spec, composed = get(k, "specialize", "heads"), get(k, "composed", "task_vectors")
        assert spec["acc_rest"] == 0.0
        assert spec["acc_target"] == composed["acc_target_own_classes"]
        head = model.heads.heads[k]
        with torch.no_grad():
            head.weight.neg_(), head.bias.neg_()
            hits = {"target": [0, 0], "rest": [0, 0]}
            for exp, x, y in batches:
                key = "target" if exp == k else "rest"
                hits[key][0] += int((model(x).argmax(1) == y).sum())
                hits[key][1] += len(y)
            head.weight.neg_(), head.bias.neg_()
        negate = get(k, "unlearn_negate", "heads")
        assert negate["acc_target"] == hits["target"][0] / hits["target"][1]
        assert negate["acc_rest"] == hits["rest"][0] / hits["rest"][1]


def test_runs_without_task_vectors_are_left_out(runs, tmp_path, capsys):
    import shutil

    from clcompose.bench.cli.main import main

    naive, _ = run(config("naive") | {"strategy_options": {}}, runs_dir=tmp_path / "naive", progress=False)
    assert main(["skills-table", str(naive.parent), "--out", str(tmp_path / "t")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("bench: error: no finished ITA, IEL or task-arithmetic run")
    assert main(["skills-table", str(runs / "runs"), "--out", str(tmp_path / "t"), "--weight", "2"]) == 2
    assert "--weight must be in [0, 1]" in capsys.readouterr().err
    ita = sorted((runs / "runs").glob("*ita*"))[0]
    shutil.copytree(ita, tmp_path / "naive" / ita.name)
    assert main(["skills-table", str(tmp_path / "naive"), "--out", str(tmp_path / "t")]) == 0
    with (tmp_path / "t" / "skills.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {r["variant"] for r in table} == {"ita"} and {r["n"] for r in table} == {"3"}  # one run, 3 targets
    out = tmp_path / "one.json"
    assert (
        main(["skills", str(tmp_path / "naive" / ita.name), "--head-control", "--target", "1", "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["head_control"] and "unlearn_drop (heads)" in capsys.readouterr().out
    assert {(r["edit"], r["applied_to"]) for r in report["rows"] if r["applied_to"] == "heads"} == {
        ("unlearn_drop", "heads"),
        ("unlearn_negate", "heads"),
        ("specialize", "heads"),
    }
