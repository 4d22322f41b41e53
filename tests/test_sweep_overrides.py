"""Per-strategy training overrides in sweep files."""

import pytest

from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.strategies.core.registry import ConfigError

SWEEP = """
name: overrides
cluster: local
seeds: 1
benchmarks: {split-digits: {n_experiences: 2}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1}}
strategies:
  naive: {}
  ita: {alpha: 0.5, train: {optimizer: adamw, lr: {grid: [0.001, 0.002]}}}
train: {epochs: 1, lr: 0.05}
"""


def test_strategy_train_overrides_merge_into_the_global_train(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    sweep = load_sweep(path, runs_dir=tmp_path / "runs")
    by = {}
    for c in sweep.cells:
        by.setdefault(c.config["strategy"], []).append(c.config)
    assert [c["train"] for c in by["naive"]] == [{"epochs": 1, "lr": 0.05}]
    assert [c["train"] for c in by["ita"]] == [
        {"epochs": 1, "lr": 0.001, "optimizer": "adamw"},
        {"epochs": 1, "lr": 0.002, "optimizer": "adamw"},
    ]
    assert all("train" not in c["strategy_options"] for c in by["ita"]) and by["ita"][0]["strategy_options"] == {
        "alpha": 0.5
    }


def test_a_malformed_strategy_train_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("train: {optimizer: adamw, lr: {grid: [0.001, 0.002]}}", "train: fast"))
    with pytest.raises(ConfigError, match="strategies.ita.train must be a mapping"):
        load_sweep(path, runs_dir=tmp_path / "runs")
