"""Hyperparameter selection: validation splits held out of training, `bench select`, sweeps that read the winners."""

import json
from pathlib import Path

import numpy as np
import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.data.benchmarks import build_benchmark, split_validation
from clcompose.bench.io import read_json
from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.strategies.core.registry import ConfigError

SELECT = """
name: sel
seeds: [0, 1]
select: {rule: final_average_accuracy, out: OUT}
benchmarks: {split-digits: {n_experiences: 2, per_class: 20, validation: 0.25}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1, input_size: 16, width: 8}}
strategies:
  naive: {train: {lr: {grid: [0.0001, 0.01, 0.05]}}}
  lwf: {alpha: {grid: [0.5, 2.0]}}
train: {epochs: 1, batch_size: 16, lr: 0.01}
"""

FINAL = """
name: final
seeds: [3]
selected: SELECTED
benchmarks: {split-digits: {n_experiences: 2, per_class: 20}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1, input_size: 16, width: 8}}
strategies:
  naive: {}
  naive@slow: {train: {lr: 0.0002}}
  lwf: {}
  slca@naive-align: {backbone_lr_scale: 1.0, selected_from: naive}
  ewc: {ewc_lambda: 10}
train: {epochs: 1, batch_size: 16, lr: 0.01}
"""


def test_validation_split_is_per_class_disjoint_and_never_reads_the_test_set():
    y = np.repeat(np.arange(3), 10)
    fit, val = split_validation(y, 0.2, np.random.default_rng(0))
    assert set(fit).isdisjoint(val) and len(fit) + len(val) == 30
    assert [int((y[val] == c).sum()) for c in range(3)] == [2, 2, 2]  # round(0.2 · 10) of each class
    plain = build_benchmark("split-digits", {"n_experiences": 2, "per_class": 20}, 0)
    held = build_benchmark("split-digits", {"n_experiences": 2, "per_class": 20, "validation": 0.25}, 0)
    assert held.info["eval_split"].startswith("validation") and plain.info["eval_split"] == "test"
    assert held.info["train_size"] == 150 and held.info["test_size"] == 50  # 10 classes × (15 + 5) of 20

    def images(stream):
        return {e.dataset[i][0].numpy().tobytes() for e in stream for i in range(len(e.dataset))}

    train, val, test = images(plain.train_stream), images(held.test_stream), images(plain.test_stream)
    assert val <= train  # the evaluation stream is drawn from the kept training images ...
    assert not val & images(held.train_stream)  # ... held out of the training experiences ...
    assert not val & test  # ... and the test set is not read
    with pytest.raises(ConfigError, match="validation"):
        build_benchmark("split-digits", {"validation": 1.5}, 0)


def _select(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "selection"
    path = tmp_path / "select.yaml"
    path.write_text(SELECT.replace("OUT", str(out)))
    runs = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--executor", "debug", "--runs-dir", runs, "--quiet"]) == 0
    assert main(["select", str(path), "--runs-dir", runs]) == 0
    return path, out


def test_select_picks_the_best_mean_validation_accuracy_and_the_final_sweep_starts_from_it(tmp_path):
    path, out = _select(tmp_path)
    selection = read_json(out / "selected.json")
    sweep = load_sweep(path, runs_dir=tmp_path / "runs")
    # the winner, computed by hand from the records: mean over seeds of final_average_accuracy per grid point
    scores: dict[tuple[str, str], list[float]] = {}
    for cell in sweep.cells:
        record = json.loads(cell.record_path.read_text())
        assert record["stream"]["eval_split"].startswith("validation")
        key = (cell.entry, json.dumps(cell.varied["strategy"] | cell.varied["train"], sort_keys=True))
        scores.setdefault(key, []).append(record["metrics"]["final_average_accuracy"])
    for entry in ("naive", "lwf"):
        points = [(json.loads(k[1]), np.mean(v)) for k, v in scores.items() if k[0] == entry]
        best = max(range(len(points)), key=lambda i: (points[i][1], -i))  # ties: the first in grid order
        table = selection["benchmarks"]["split-digits"][entry]
        chosen = table["chosen"]["strategy"] | table["chosen"]["train"]
        assert chosen == points[best][0] and table["score"] == pytest.approx(points[best][1])
        assert len(table["grid"]) == len(points) and all(row["n_seeds"] == 2 for row in table["grid"])
    assert selection["rule"] == "final_average_accuracy" and "validation" in selection["rule_text"]
    assert "Hyperparameter selection" in (out / "README.md").read_text()

    final = tmp_path / "final.yaml"
    final.write_text(FINAL.replace("SELECTED", str(out / "selected.json")))
    cells = {c.entry: c.config for c in load_sweep(final, runs_dir=tmp_path / "final-runs").cells}
    naive = selection["benchmarks"]["split-digits"]["naive"]["chosen"]["train"]
    lwf = selection["benchmarks"]["split-digits"]["lwf"]["chosen"]["strategy"]
    assert cells["naive"]["train"]["lr"] == naive["lr"]
    assert cells["naive@slow"]["train"]["lr"] == 0.0002  # the entry's own value wins
    assert cells["naive@slow"]["strategy"] == "naive"
    assert cells["lwf"]["strategy_options"]["alpha"] == lwf["alpha"]
    assert cells["slca@naive-align"]["train"]["lr"] == naive["lr"]  # selected_from: naive
    assert cells["slca@naive-align"]["strategy_options"] == {"backbone_lr_scale": 1.0}
    assert cells["ewc"]["train"]["lr"] == 0.01  # no winner for ewc: the sweep file's values
    from clcompose.bench.sweeps.select import tuning_lines

    lines = tuning_lines(load_sweep(final, runs_dir=tmp_path / "x").data, list(cells), str(final))
    assert any(line.startswith("- `ewc` (split-digits): set by hand") for line in lines)
    assert any("`naive@slow`" in line and "fixed by the sweep file" in line for line in lines)
    (slow,) = [line for line in lines if "`naive@slow`" in line]
    assert "lr=0.0002 (over the selected lr=" in slow and "selected on validation data: epochs" not in slow, slow

    # the leaderboard of a final sweep: how each row was tuned, and the paired comparison of its compare: pairs
    two = tmp_path / "two.yaml"
    text = FINAL.replace("SELECTED", str(out / "selected.json")).replace("seeds: [3]", "seeds: [3, 4]")
    text = text.split("  lwf: {}")[0] + "compare: [[naive, naive@slow]]\ntrain: {epochs: 1, batch_size: 16, lr: 0.01}\n"
    two.write_text(text)
    runs = str(tmp_path / "two-runs")
    assert main(["sweep", str(two), "--executor", "debug", "--runs-dir", runs, "--quiet"]) == 0
    assert main(["leaderboard", str(two), "--runs-dir", runs, "--out", str(tmp_path / "lb"), "--no-plots"]) == 0
    page = (tmp_path / "lb" / "README.md").read_text()
    assert "## How each row's hyperparameters were chosen" in page and "selected on validation data" in page
    acc = {}
    for cell in load_sweep(two, runs_dir=runs).cells:
        acc[(cell.entry, cell.config["seed"])] = read_json(cell.record_path)["metrics"]["final_average_accuracy"]
    diffs = [acc[("naive", s)] - acc[("naive@slow", s)] for s in (3, 4)]
    half = 12.706204736174707 * np.std(diffs, ddof=1) / np.sqrt(2)  # Student's t, 1 degree of freedom
    expected = f"| `naive` | `naive@slow` | {100 * np.mean(diffs):+.1f} ± {100 * half:.1f} | 2 |"
    assert expected in page
    assert (tmp_path / "lb" / "tables" / "split-digits-comparisons.csv").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        (SELECT.replace(", validation: 0.25", ""), "must evaluate on validation data"),
        (SELECT.replace("rule: final_average_accuracy", "rule: best_test"), "unknown rule"),
        (SELECT.replace("select: {", "selected: x.json\nselect: {"), "cannot itself start from selected"),
        (FINAL.replace("SELECTED", "does-not-exist.json"), "does not exist; run the selection sweep"),
    ],
)
def test_bad_selection_files_give_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("OUT", str(tmp_path / "o")))
    assert main(["sweep", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error:") and message in err[0]


def test_select_refuses_unfinished_or_non_selection_sweeps(tmp_path, capsys):
    path = tmp_path / "select.yaml"
    path.write_text(SELECT.replace("OUT", str(tmp_path / "o")))
    assert main(["select", str(path), "--runs-dir", str(tmp_path / "runs")]) != 0
    assert "selection cells have no record yet" in capsys.readouterr().err
    final = tmp_path / "plain.yaml"
    final.write_text(FINAL.replace("selected: SELECTED\n", "").replace(", selected_from: naive", ""))
    assert main(["select", str(final), "--runs-dir", str(tmp_path / "runs")]) != 0
    assert "not a selection sweep" in capsys.readouterr().err
    corrupt = tmp_path / "selected.json"
    corrupt.write_text('{"format": "something-else"}')
    final.write_text(FINAL.replace("SELECTED", str(corrupt)))
    assert main(["sweep", str(final), "--dry-run", "--runs-dir", str(tmp_path / "runs")]) != 0
    assert "not a selection file" in capsys.readouterr().err
