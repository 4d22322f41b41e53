"""The paper sweeps: resolved cells carry the paper's hyperparameters, every ITA/IEL cell has its published
target, Table 1's competitors are in every sweep (their C-100 targets too), and a paper sweep runs end to end
at smoke scale (records, leaderboard with the paper column, targets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.report.targets import load_targets, target_for
from clcompose.bench.runs.config import RunConfig
from clcompose.bench.sweeps.sweep import load_sweep

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"
FILES = ["cifar100", "imagenet-r", "cub200", "caltech256", "mit67", "resisc45", "cropdiseases"]
COMPETITORS = ["der++", "slca", "l2p", "coda-prompt", "inflora", "tmc", "magmax"]
# Table 1's C-100 column (paper000.md §7.1); SLCA and MagMax are not in Table 1
TABLE1 = {"der++": 83.02, "l2p": 87.32, "coda-prompt": 86.48, "inflora": 87.17, "tmc": 78.42}
# Strategy bugs (strategies/ is not this test's to fix) that a paper sweep's smoke run hits, with the error each
# cell records: TMC's linearised forward (torch.func.jvp) goes through timm's fused scaled_dot_product_attention,
# whose fused kernels have no forward-mode AD (the CPU flash kernel here; CUDA's fused kernels presumably too,
# unverified: no GPU), so TMC on a ViT fails at its first training step. Once fixed (e.g. jvp under
# torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), the cell passes and the test stops being an expected failure.
KNOWN_SMOKE_FAILURES: dict[str, str] = {}  # entry → the error a smoke cell is known to fail with


def _resolved(cell):
    return RunConfig.from_dict(cell.config).resolve().to_dict()


def test_cifar100_dry_run_resolves_the_papers_hyperparameters(tmp_path, capsys):
    assert main(["sweep", str(PAPER / "cifar100.yaml"), "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "90 cells" in shown and "#SBATCH --gpus-per-node=1" in shown
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
    baselines = {e: by_entry[e][0] for e in ("naive", "joint", "ewc", "lwf", "der++")}
    assert all(c["train"]["batch_size"] == 128 for c in baselines.values())
    assert sweep.profile.gpus_per_node == 1


def test_cifar100_competitors_carry_their_methods_hyperparameters(tmp_path):
    sweep = load_sweep(PAPER / "cifar100.yaml", runs_dir=tmp_path)
    resolved = [_resolved(c) for c in sweep.cells if c.entry in COMPETITORS]
    cfg = {c["strategy"]: c for c in resolved if c["seed"] == 0}
    assert sorted(cfg) == sorted(COMPETITORS)
    assert all(c["backbone"] == "vit-b16" and c["benchmark"] == "split-cifar100-224" for c in cfg.values())
    so = {e: c["strategy_options"] for e, c in cfg.items()}
    tr = {e: c["train"] for e, c in cfg.items()}
    assert (so["der++"]["mem_size"], so["der++"]["alpha"], so["der++"]["beta"]) == (1000, 0.3, 0.5)
    assert (tr["der++"]["optimizer"], tr["der++"]["lr"], tr["der++"]["epochs"]) == ("adamw", 3e-4, 20)
    assert so["slca"]["backbone_lr_scale"] == 0.01 and so["slca"]["align_epochs"] == 5
    assert so["slca"]["align_temperature"] == 0.1
    assert (tr["slca"]["optimizer"], tr["slca"]["lr"], tr["slca"]["momentum"], tr["slca"]["epochs"]) == (
        "sgd",
        0.01,
        0.9,
        20,
    )
    assert (so["l2p"]["pool_size"], so["l2p"]["prompt_length"], so["l2p"]["top_k"]) == (10, 5, 5)
    assert so["l2p"]["pull_constraint"] == 0.5 and so["l2p"]["batchwise_prompt"] is True
    assert (tr["l2p"]["optimizer"], tr["l2p"]["lr"], tr["l2p"]["epochs"], tr["l2p"]["batch_size"]) == (
        "adam",
        0.03,
        5,
        128,
    )
    coda = so["coda-prompt"]
    assert (coda["components_per_task"], coda["prompt_length"], coda["layers"], coda["ortho_mu"]) == (
        10,
        8,
        [0, 1, 2, 3, 4],
        0.0,
    )
    assert (tr["coda-prompt"]["optimizer"], tr["coda-prompt"]["lr"], tr["coda-prompt"]["epochs"]) == ("adam", 1e-3, 20)
    assert so["inflora"]["rank"] == 10 and so["inflora"]["threshold"] == 0.95
    assert (tr["inflora"]["optimizer"], tr["inflora"]["lr"], tr["inflora"]["weight_decay"]) == ("adam", 5e-4, 0.0)
    assert so["tmc"]["tuning"] == "full" and so["tmc"]["composition"] == "tangent"
    assert so["magmax"]["tuning"] == "full" and so["magmax"]["composition"] == "magmax"
    for entry in ("tmc", "magmax"):
        assert tr[entry]["batch_size"] * tr[entry]["virtual_batch"] == 128


@pytest.mark.parametrize("name", FILES)
def test_every_paper_sweep_has_table_1s_competitors(tmp_path, name):
    sweep = load_sweep(PAPER / f"{name}.yaml", runs_dir=tmp_path)
    seeds: dict[str, list[int]] = {}
    for cell in sweep.cells:
        cfg = _resolved(cell)
        if cfg["strategy"] in COMPETITORS:
            assert cell.entry == cfg["strategy"]
            seeds.setdefault(cell.entry, []).append(cfg["seed"])
            if cfg["strategy"] == "slca":  # SLCA ships 50 epochs for ImageNet-R and CUB, 20 for CIFAR-100
                assert cfg["train"]["epochs"] == (50 if name in ("imagenet-r", "cub200") else 20)
    assert {e: sorted(s) for e, s in seeds.items()} == {e: [0, 1, 2] for e in COMPETITORS}


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
        elif cfg["strategy"] in TABLE1 and name == "cifar100":
            assert target is not None and target.source == "Table 1", cell.entry
            assert target.value == TABLE1[cfg["strategy"]]
        elif cfg["strategy"] == "task-arithmetic" or name != "cifar100" or cfg["strategy"] in COMPETITORS:
            assert target is None
    assert len(seen) == 18


def test_targets_hold_the_papers_numbers():
    targets = {(t.benchmark, t.strategy, t.row): t.value for t in load_targets()}
    assert targets[("split-cifar100-224", "ita", "ITA-ia3 full reg.")] == 90.66
    assert targets[("split-imagenet-r", "iel", "IEL-full full reg.")] == 80.09
    assert targets[("split-cropdiseases", "ita", "ITA-lora only on CLS")] == 96.22
    assert targets[("split-cifar100-224", "joint", "Joint (upper bound)")] == 91.74
    assert targets[("split-cifar100-224", "der++", "DER++ (buffer 1000)")] == 83.02
    assert targets[("split-cifar100-224", "tmc", "TMC (full fine-tuning)")] == 78.42
    assert len(targets) == 18 * 7 + 4 + len(TABLE1)


def test_smoke_scale_shrinks_an_entrys_own_epochs(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    sweep = load_sweep(PAPER / "cifar100.yaml", runs_dir=tmp_path, scale="smoke")
    epochs = {c.entry: _resolved(c)["train"]["epochs"] for c in sweep.cells}
    assert set(COMPETITORS) <= set(epochs) and set(epochs.values()) == {1}


@pytest.mark.slow
def test_a_paper_sweep_runs_end_to_end_at_smoke_scale(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    sweep_file = str(PAPER / "cropdiseases.yaml")
    runs = tmp_path / "runs"
    rc = main(["sweep", sweep_file, "--scale", "smoke", "--runs-dir", str(runs), "--quiet"])
    sweep = load_sweep(sweep_file, runs_dir=runs, scale="smoke")
    assert len(sweep.cells) == 30 and set(COMPETITORS) <= {c.entry for c in sweep.cells}
    failed = {c.entry: c.record_path.parent / "failed.json" for c in sweep.cells if not c.record_path.exists()}
    assert set(failed) <= set(KNOWN_SMOKE_FAILURES), sorted(failed)  # every other cell, competitors included
    for entry, why in KNOWN_SMOKE_FAILURES.items():
        assert entry not in failed or why in failed[entry].read_text(), failed[entry].read_text()[-2000:]
    assert rc == (1 if failed else 0)
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
    if failed:  # everything else was checked: report the known strategy bug as an expected failure
        pytest.xfail(f"known failures at smoke scale: {', '.join(sorted(failed))} (see KNOWN_SMOKE_FAILURES)")


def test_the_competitors_sweep_is_the_main_jobs_stream_with_der_slca_tmc_magmax(tmp_path):
    from clcompose.bench.report.controls import check_compare

    path = PAPER.parents[0] / "sweep-competitors.yaml"
    sweep = load_sweep(path, runs_dir=tmp_path)
    cfgs = [(c.entry, _resolved(c)) for c in sweep.cells]
    assert len(cfgs) == 7 * 3
    for _, cfg in cfgs:
        assert cfg["benchmark"] == "split-fmnist" and cfg["backbone"] == "efficientnet-lite0"
        assert cfg["backbone_options"]["image_size"] == 32 and cfg["train"]["epochs"] == 2
        assert cfg["benchmark_options"]["per_class"] == 100 and cfg["benchmark_options"]["test_per_class"] == 100
    mem = {e: c["strategy_options"]["mem_size"] for e, c in cfgs if c["strategy"] == "der++"}
    assert mem == {"der++": 1000, "der++@mem200": 200}
    assert {c["strategy"] for _, c in cfgs} >= {"der++", "slca", "tmc", "magmax"}
    pairs = check_compare(sweep.data, str(path))
    assert ("der++", "der++@mem200") in pairs and ("tmc", "task-arithmetic") in pairs


def test_the_vit_competitors_sweep_reads_its_selected_learning_rates(tmp_path):
    """examples/sweep-competitors-vit.yaml: the ViT-only competitors next to the suite's methods on the main
    stream, each at the learning rate examples/select-vit.yaml chose on validation data."""
    import json

    from clcompose.bench.report.controls import check_compare

    path = PAPER.parents[0] / "sweep-competitors-vit.yaml"
    sweep = load_sweep(path, runs_dir=tmp_path)
    cfgs = {(c.entry, c.hash): _resolved(c) for c in sweep.cells}
    assert len(cfgs) == 9 * 3
    assert {c["strategy"] for c in cfgs.values()} >= {"l2p", "coda-prompt", "inflora", "ita", "iel", "linear-probe"}
    selected = json.loads((PAPER.parents[1] / "results" / "selection-vit" / "selected.json").read_text())
    winners = selected["benchmarks"]["split-fmnist"]
    for (entry, _hash), cfg in cfgs.items():
        assert cfg["backbone"] == "vit-b16" and cfg["backbone_options"]["pretrained"] is False
        assert cfg["benchmark"] == "split-fmnist" and cfg["train"]["epochs"] == 5
        won = winners[entry]["chosen"]
        for key, value in (won.get("train") or {}).items():
            assert cfg["train"][key] == value, (entry, key)
        for key, value in (won.get("strategy") or {}).items():
            assert cfg["strategy_options"][key] == value, (entry, key)
    pairs = check_compare(sweep.data, str(path))
    assert ("coda-prompt", "l2p") in pairs and ("inflora", "task-arithmetic") in pairs
