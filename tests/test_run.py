"""One seeded run end to end: the record's contents, determinism, the expected ordering of baselines."""

import json

import pytest

from clcompose.bench.runs.run import RunConfig, run

SMALL = {  # digits stream + a small CNN pre-trained on MNIST-5k: seconds on one CPU thread
    "benchmark": "split-digits",
    "backbone": "small-cnn",
    "benchmark_options": {"n_experiences": 5, "per_class": 40},
    "backbone_options": {"source": "mnist5k", "pretrain_epochs": 3, "width": 8, "input_size": 16},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.05},
}


def small(strategy: str, **extra) -> dict:
    cfg = json.loads(json.dumps(SMALL)) | {"strategy": strategy}
    for k, v in extra.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


def test_record_holds_config_seeds_provenance_timings_and_matrix(tmp_path):
    path, rec = run(
        small("ewc", seed=3, stream_seed=4, strategy_options={"ewc_lambda": 10}), runs_dir=tmp_path, progress=False
    )
    assert path.is_file() and json.loads(path.read_text()) == rec
    assert path.parent.name == rec["run_id"] and rec["status"] == "complete"
    cfg = rec["config"]
    assert cfg["strategy_options"] == {"ewc_lambda": 10.0, "mode": "separate", "decay_factor": 0.9}
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["optimizer"] == "sgd"  # defaults resolved and stored
    assert rec["seeds"] == {"seed": 3, "stream_seed": 4}
    env = rec["environment"]
    assert env["packages"]["torch"].startswith("2.13.0") and env["packages"]["avalanche-lib"] == "0.6.0"
    assert "commit" in env["git"] and env["host"] and env["python"].startswith("3.11")
    assert len(rec["timing"]["steps"]) == 5
    assert all(s["train_wall_s"] > 0 and s["train_cpu_s"] > 0 for s in rec["timing"]["steps"])
    assert rec["peak_memory_mb"] > 0
    m = rec["accuracy_matrix"]
    assert len(m) == 5 and all(len(r) == 5 for r in m)
    assert all(m[i][j] == 0.0 for i in range(5) for j in range(i + 1, 5))  # unseen classes are never predicted
    from clcompose.strategies.metrics.continual import summarize

    assert rec["metrics"] == summarize(m)  # metrics derive from the stored matrix
    assert rec["stream"]["class_order"] and rec["stream"]["train_size"] == 400


def test_same_config_and_seed_gives_identical_metrics(tmp_path):
    _, a = run(small("naive", seed=1), runs_dir=tmp_path / "a", progress=False)
    _, b = run(small("naive", seed=1), runs_dir=tmp_path / "b", progress=False)
    _, c = run(small("naive", seed=2), runs_dir=tmp_path / "c", progress=False)
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["metrics"] == b["metrics"]
    assert a["run_id"] == b["run_id"] != c["run_id"]
    assert a["accuracy_matrix"] != c["accuracy_matrix"]  # the training seed matters


def test_baseline_ordering_on_digits(tmp_path):
    """Class-IL: naive collapses to about the last experience, joint is far above it."""
    finals = {}
    for name in ("naive", "joint", "lwf"):
        _, rec = run(small(name), runs_dir=tmp_path, progress=False)
        finals[name] = rec["metrics"]["final_average_accuracy"]
    assert finals["naive"] <= 0.2 + 0.1, finals
    assert finals["joint"] >= finals["naive"] + 0.4, finals
    assert 0 <= finals["lwf"] <= 1


def test_an_existing_record_is_never_overwritten(tmp_path):
    from clcompose.bench.io import RecordExistsError

    out = tmp_path / "mine.json"
    out.write_text("precious")
    with pytest.raises(RecordExistsError):
        run(small("naive"), out=out, progress=False)
    assert out.read_text() == "precious"


def test_run_config_rejects_bad_top_level_values():
    from clcompose.strategies.core.registry import ConfigError

    with pytest.raises(ConfigError, match="seed"):
        RunConfig.from_dict({"seed": -1})
    with pytest.raises(ConfigError, match="unknown run config key"):
        RunConfig.from_dict({"sede": 1})
