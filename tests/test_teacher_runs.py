"""Teacher streams through `bench run`: probe metrics in the record, resume of a meta-learner bit for bit,
one-line errors, and the must-fail controls."""

import pytest

from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.run import run

TINY = {"tasks_per_combination": 2, "n_support": 16, "n_query": 16, "n_test": 16}
META = {"outer_steps": 3, "meta_batch": 4, "inner_steps": 3, "templates": 6}


def _config(benchmark, strategy, **extra):
    return {
        "benchmark": benchmark,
        "backbone": "mlp",
        "strategy": strategy,
        "seed": 1,
        "stream_seed": 2,
        "benchmark_options": TINY | extra.pop("benchmark_options", {}),
        "backbone_options": {"hidden": [16]},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
    } | extra


class Killed(Exception):
    pass


def test_resumed_meta_learner_run_is_identical(tmp_path, monkeypatch):
    cfg = _config("teacher-connected", "meta-hnet", strategy_options=META)
    _, reference = run(cfg, runs_dir=tmp_path / "a", progress=False)
    for key in ("id_accuracy", "ood_accuracy", "comp_gap", "decode_r2", "ood_noinfo_accuracy"):
        assert isinstance(reference["metrics"][key], float)
    assert reference["stream"]["connected"] and reference["stream"]["compositional"]
    real_save, calls = checkpoint.save, []

    def save_then_die(*args, **kwargs):
        out = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise Killed()
        return out

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "b", progress=False)
    import torch

    torch.manual_seed(999)
    _, resumed = run(cfg, runs_dir=tmp_path / "b", progress=False)
    assert resumed["metrics"] == reference["metrics"] and resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["strategy_extras"] == reference["strategy_extras"]
    assert resumed["step_metrics"] == reference["step_metrics"]
    assert [r["from_step"] for r in resumed["resumes"]] == [3]
    # probe accuracy after every step; after the last it is the final metric (same state, same adaptation)
    assert [r["step"] for r in reference["step_metrics"]] == list(range(6))
    assert reference["step_metrics"][-1]["ood_accuracy"] == reference["metrics"]["ood_accuracy"]
    # connected curriculum: the probe pairs split into those of modules seen so far (CompGen(e)) and the rest
    # (NonComp(e)) while modules are unseen; after experience 0 only module 0 is seen, so no pair is inside
    first, middle = reference["step_metrics"][0], reference["step_metrics"][3]
    assert "ood_seen_accuracy" not in first and "ood_unseen_accuracy" not in first
    assert {"ood_seen_accuracy", "ood_unseen_accuracy"} <= set(middle) and "ood_seen_accuracy" not in reference[
        "step_metrics"
    ][-1]
    # after experience 3 (modules 0–3), 2 of the 8 probe pairs ({0,3}, {1,3}) are inside, with equally many tasks
    assert middle["ood_accuracy"] == pytest.approx(
        (2 * middle["ood_seen_accuracy"] + 6 * middle["ood_unseen_accuracy"]) / 8, abs=1e-6
    )
    # and measuring it changes nothing in the run
    import clcompose.bench.data.teacher_streams as streams

    monkeypatch.setattr(streams, "probe_accuracies", lambda data, strategy, trained: {})
    _, unmeasured = run(cfg, runs_dir=tmp_path / "c", progress=False)
    assert (
        unmeasured["accuracy_matrix"] == reference["accuracy_matrix"] and unmeasured["metrics"] == reference["metrics"]
    )


def test_plain_strategy_on_the_one_module_stream(tmp_path):
    _, rec = run(_config("teacher-one-module", "naive"), runs_dir=tmp_path, progress=False)
    m = rec["metrics"]
    assert len(rec["accuracy_matrix"]) == 6 and rec["config"]["backbone_options"]["in_features"] is None
    assert 0 <= m["ood_accuracy"] <= 1 and m["comp_gap"] == pytest.approx(m["id_accuracy"] - m["ood_accuracy"])
    assert "composition_gain" not in m  # naive keeps no task vectors
    assert not rec["stream"]["connected"] and rec["stream"]["compositional"]


@pytest.mark.parametrize(
    "strategy,options", [("task-arithmetic", {"tuning": "full", "layers": "all"}), ("meta-hnet", META)]
)
def test_composition_gain_of_merged_task_parameters(strategy, options, tmp_path):
    """The one-module stream scores merged task vectors (task arithmetic) and merged fast parameters (the
    hypernetwork) on module pairs: a gain in [−1, 1], recorded next to the pairs' few-shot accuracy."""
    _, rec = run(_config("teacher-one-module", strategy, strategy_options=options), runs_dir=tmp_path, progress=False)
    m = rec["metrics"]
    assert isinstance(m["composition_gain"], float) and -1.0 <= m["composition_gain"] <= 1.0, m
    assert len(rec["stream"]["probes"]["ood"]) == 15  # every pair of the 6 modules


def test_bad_input_is_one_line(tmp_path, capsys):
    from clcompose.bench.cli.main import main

    for args in (
        [
            "--benchmark",
            "split-digits",
            "--backbone",
            "mlp",
            "--strategy",
            "meta-hnet",
            "--set",
            "backbone.in_features=64",
        ],
        [
            "--benchmark",
            "teacher-connected",
            "--backbone",
            "mlp",
            "--strategy",
            "meta-anil",
            "--set",
            "benchmark.k_hot=1",
        ],
        [
            "--benchmark",
            "teacher-random",
            "--backbone",
            "mlp",
            "--strategy",
            "naive",
            "--set",
            "benchmark.n_experiences=40",
        ],
    ):
        capsys.readouterr()
        assert main(["run", *args, "--quiet", "--runs-dir", str(tmp_path)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bench: error:"), lines


CONTROL = {"tasks_per_combination": 4, "n_support": 32, "n_query": 32, "n_test": 32}


@pytest.fixture(scope="module")
def noncomp_runs(tmp_path_factory):
    out = {}
    for strategy in ("meta-hnet", "meta-anil", "naive"):
        cfg = _config(
            "teacher-noncomp",
            strategy,
            benchmark_options=CONTROL,
            seed=0,
            stream_seed=0,
            backbone_options={"hidden": [32]},
            train={"epochs": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
            strategy_options={"outer_steps": 30, "meta_batch": 8} if strategy.startswith("meta") else {},
        )
        out[strategy] = run(cfg, runs_dir=tmp_path_factory.mktemp(strategy), progress=False)[1]["metrics"]
    return out


@pytest.mark.slow
def test_noncompositional_control_stays_near_no_information(noncomp_runs):
    """Must-fail control at this (tiny) scale: on combinations using the never-trained module, what a learner
    gained from the stream (accuracy above the same adaptation from its untrained state) stays within 0.1 for
    every learner; the meta-learners are worse there than on held-out combinations of trained modules, and the
    hypernetwork gains clearly more on those (so the control is not vacuous). At the sweep's scale ANIL's
    64-shot read-out on its trained body gets further above its no-information level (see the issue-5 note)."""
    for strategy, m in noncomp_runs.items():
        assert m["noncomp_accuracy"] - m["noncomp_noinfo_accuracy"] <= 0.1, (strategy, m)
    for strategy in ("meta-hnet", "meta-anil"):
        m = noncomp_runs[strategy]
        assert m["noncomp_accuracy"] < m["ood_accuracy"], (strategy, m)
    hnet = noncomp_runs["meta-hnet"]
    ood_gain = hnet["ood_accuracy"] - hnet["ood_noinfo_accuracy"]
    assert ood_gain >= 0.1, hnet
    # combinations with the unseen module still hold a trained one, so some gain there is expected; less than
    # on held-out combinations of trained modules (seed 0: 0.075 vs 0.136)
    assert hnet["noncomp_accuracy"] - hnet["noncomp_noinfo_accuracy"] < ood_gain, hnet


@pytest.mark.slow
def test_disconnected_support_is_clearly_worse_on_cross_combinations(tmp_path):
    """Must-fail control of the reference (its connected vs disconnected supports, M = 6, two generated layers:
    324 vs 36 trained combinations, both scored few-shot on the same 117 combinations in neither): the
    hypernetwork fits its trained combinations equally well from either support, but only connected support
    carries over to the held-out combinations. 300 second-order outer steps; measured on seeds 0, 1, 2: OOD
    0.356/0.332/0.387 connected vs 0.262/0.242/0.264 disconnected (the 6000-step sweep in
    examples/sweep-teacher-control.yaml: 0.307 vs 0.205)."""
    out = {}
    for stream in ("teacher-connected", "teacher-disconnected"):
        cfg = _config(
            stream,
            "meta-hnet",
            seed=0,
            stream_seed=0,
            backbone_options={"hidden": [64, 64]},
            benchmark_options={
                "layout": "reference",
                "generated_layers": 2,
                "n_experiences": 1,
                "tasks_per_combination": 1,
                "n_support": 64,
                "n_query": 64,
                "n_test": 64,
            },
            strategy_options={"outer_steps": 300, "meta_batch": 16},
        )
        out[stream] = run(cfg, runs_dir=tmp_path / stream, progress=False)[1]["metrics"]
    conn, disc = out["teacher-connected"], out["teacher-disconnected"]
    assert abs(conn["id_accuracy"] - disc["id_accuracy"]) < 0.05, out  # the same fit of the trained combinations
    assert disc["ood_accuracy"] <= conn["ood_accuracy"] - 0.05, out
    assert conn["ood_accuracy"] - conn["ood_noinfo_accuracy"] >= 2 * (
        disc["ood_accuracy"] - disc["ood_noinfo_accuracy"]
    ), out
    assert conn["decode_r2"] > 0.2 > 0 > disc["decode_r2"], out
