"""The paper sweeps: resolved cells carry the paper's hyperparameters, every ITA/IEL cell has its published
target, and a paper sweep runs end to end at smoke scale (records, leaderboard with the paper column, targets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.report.targets import load_targets, target_for
from clcompose.bench.runs.config import RunConfig
from clcompose.bench.sweeps.sweep import load_sweep

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"
FILES = ["cifar100", "imagenet-r", "cub200", "caltech256", "mit67", "resisc45", "cropdiseases"]


def _resolved(cell):
    return RunConfig.from_dict(cell.config).resolve().to_dict()


def test_cifar100_dry_run_resolves_the_papers_hyperparameters(tmp_path, capsys):
    assert main(["sweep", str(PAPER / "cifar100.yaml"), "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "69 cells" in shown and "#SBATCH --gpus-per-node=1" in shown
    sweep = load_sweep(PAPER / "cifar100.yaml", runs_dir=tmp_path)
    by_entry = {}
    for cell in sweep.cells:
        by_entry.setdefault(cell.entry, []).append(_resolved(cell))
    assert all(sorted(c["seed"] for c in cfgs) == [0, 1, 2] for cfgs in by_entry.values())
    ita, iel = by_entry["ita@lora"][0], by_entry["iel@lora"][0]
    for cfg in (ita, iel):
        assert cfg["benchmark"] == "split-cifar100-224" and cfg["backbone"] == "vit-b16"
        assert cfg["train"]["lr"] == 3e-4 and cfg["train"]["optimizer"] == "adamw"
        assert cfg["train"]["weight_decay"] == 0.0 and cfg["train"]["epochs"] == 20
        assert cfg["train"]["batch_size"] * cfg["train"]["virtual_batch"] == 8 * 16 == 128
        so = cfg["strategy_options"]
        assert so["preset"] == "reference" and so["tuning"] == "lora" and so["rank"] == 16
        assert so["qkv_rank_multiplier"] == 3 and so["probe_epochs"] == 3 and so["head_reg_l2"] == 0.001
        assert so["gaussian_components"] == 5 and so["clip_grad"] == 100.0
        assert cfg["backbone_options"]["normalization"] == "in21k"
        assert cfg["benchmark_options"]["image_size"] == 224 and cfg["benchmark_options"]["class_order"] == "fixed"
    assert ita["strategy_options"]["alpha"] == 0.02 and ita["strategy_options"]["head_reg_fisher"] == 0.025
    assert iel["strategy_options"]["beta"] == 20 and iel["strategy_options"]["head_reg_fisher"] == 0.1
    for tuning in ("full", "lora", "ia3"):
        noreg = by_entry[f"ita@{tuning}-noreg"][0]["strategy_options"]
        cls = by_entry[f"ita@{tuning}-clsonly"][0]["strategy_options"]
        assert noreg["alpha"] == 0 and noreg["head_reg_fisher"] == 0
        assert cls["alpha"] == 0 and cls["head_reg_fisher"] == 0.025
    baselines = {e: by_entry[e][0] for e in ("naive", "joint", "ewc", "lwf")}
    assert all(c["train"]["batch_size"] == 128 for c in baselines.values())
    assert sweep.profile.gpus_per_node == 1


def test_cropdiseases_uses_its_shipped_settings(tmp_path):
    sweep = load_sweep(PAPER / "cropdiseases.yaml", runs_dir=tmp_path)
    ita = next(_resolved(c) for c in sweep.cells if c.entry == "ita@lora")
    assert ita["strategy_options"]["alpha"] == 5.0 and ita["train"]["epochs"] == 5
    assert ita["strategy_options"]["probe_epochs"] == 1 and ita["strategy_options"]["head_reg_fisher"] == 0.1
    assert ita["backbone_options"]["normalization"] == "imagenet"


@pytest.mark.parametrize("name", FILES)
def test_every_ita_iel_cell_of_a_paper_sweep_has_its_published_target(tmp_path, name):
    targets = load_targets()
    sweep = load_sweep(PAPER / f"{name}.yaml", runs_dir=tmp_path)
    seen = set()
    for cell in sweep.cells:
        cfg = _resolved(cell)
        target = target_for(cfg, targets)
        if cfg["strategy"] in ("ita", "iel"):
            assert target is not None, cell.entry
            method, rest = cell.entry.split("@")
            tuning, _, row = rest.partition("-")
            assert target.row.startswith(f"{method.upper()}-{tuning} ")
            assert ("without" in target.row) == (row == "noreg") and ("CLS" in target.row) == (row == "clsonly")
            seen.add(cell.entry)
        elif cfg["strategy"] == "task-arithmetic" or name != "cifar100":
            assert target is None
    assert len(seen) == 18


def test_targets_hold_the_papers_numbers():
    targets = {(t.benchmark, t.strategy, t.row): t.value for t in load_targets()}
    assert targets[("split-cifar100-224", "ita", "ITA-ia3 full reg.")] == 90.66
    assert targets[("split-imagenet-r", "iel", "IEL-full full reg.")] == 80.09
    assert targets[("split-cropdiseases", "ita", "ITA-lora only on CLS")] == 96.22
    assert targets[("split-cifar100-224", "joint", "Joint (upper bound)")] == 91.74
    assert len(targets) == 18 * 7 + 4


@pytest.mark.slow
def test_a_paper_sweep_runs_end_to_end_at_smoke_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    sweep_file = str(PAPER / "cropdiseases.yaml")
    runs = tmp_path / "runs"
    assert main(["sweep", sweep_file, "--scale", "smoke", "--runs-dir", str(runs), "--quiet"]) == 0
    sweep = load_sweep(sweep_file, runs_dir=runs, scale="smoke")
    assert len(sweep.cells) == 23 and all(c.record_path.exists() for c in sweep.cells)
    out = tmp_path / "board"
    common = ["--scale", "smoke", "--runs-dir", str(runs)]
    assert main(["leaderboard", sweep_file, "--out", str(out), "--no-plots", *common]) == 0
    page = (out / "README.md").read_text()
    assert "Paper (%)" in page and "95.85 (Table 2)" in page
    capsys.readouterr()
    assert main(["check-targets", sweep_file, "--margin", "1", *common]) == 1  # a tiny random ViT is far below
    assert "FAIL split-cropdiseases" in capsys.readouterr().out
    assert main(["check-targets", sweep_file, "--margin", "100", *common]) == 0
    assert "18 of 18 cells within 100 points" in capsys.readouterr().out
