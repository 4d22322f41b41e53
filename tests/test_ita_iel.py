"""ITA, IEL and task arithmetic as strategies: training forward, equivalences, end-to-end runs, skills."""

import json
import math

import pytest
import torch

from clcompose.bench.runs.run import run
from clcompose.strategies.task_vectors.composable import ComposableNet
from tests.test_regularizers import tiny_model

DIGITS = {
    "benchmark": "split-digits",
    "backbone": "small-cnn",
    "benchmark_options": {"n_experiences": 3, "per_class": 24, "test_per_class": 20},
    "backbone_options": {"source": "mnist5k", "pretrain_epochs": 3, "width": 8, "input_size": 16},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.002},
}
FAST = {
    "fisher_max_examples": 24,
    "probe_epochs": 5,
    "align_epochs": 2,
    "align_epochs_per_task": 1,
    "align_per_class": 32,
    "rank": 2,
    "diagnostics_examples": 20,
}


def config(strategy: str, **options) -> dict:
    cfg = json.loads(json.dumps(DIGITS))
    cfg["strategy"] = strategy
    cfg["strategy_options"] = FAST | options
    return cfg


def test_iel_trains_through_the_composed_model_with_past_vectors_detached():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*list(tiny_model().children())[:-1])
    backbone.out_features = 5
    net = ComposableNet(backbone, 5, style="full", layers="all", train_composition="composed")
    for _ in range(3):
        t = net.pool.add_task()
        for p in net.pool.task_parameters(t):
            p.data.normal_()
        net.invalidate()
    for t in range(2):
        net.pool.freeze(t)
    net.train()
    w = net.backbone_weights()
    base = net.pool.base_weights()
    for n in net.pool.names:
        expected = base[n] + sum(net.pool.deltas(s)[n] for s in range(3)) / 3
        torch.testing.assert_close(w[n], expected)
    x = torch.randn(2, 2, 6, 6)
    net.pool.forward_with(w, x).sum().backward()
    assert all(p.grad is None for t in range(2) for p in net.pool.task_parameters(t))
    cur = net.pool.task_parameters(2)[0]
    assert cur.grad is not None and cur.grad.abs().sum() > 0
    net.train_composition = "individual"
    net.invalidate()
    w_ita = net.backbone_weights()
    for n in net.pool.names:
        torch.testing.assert_close(w_ita[n], base[n] + net.pool.deltas(2)[n])


def test_ita_with_alpha_zero_equals_task_arithmetic_with_average_composition(tmp_path):
    _, ita = run(config("ita", alpha=0.0, head_reg_l2=0.0), runs_dir=tmp_path / "ita", progress=False)
    _, ta = run(config("task-arithmetic", composition="average"), runs_dir=tmp_path / "ta", progress=False)
    assert ita["accuracy_matrix"] == ta["accuracy_matrix"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ita" / ita["run_id"] / "task_vectors.safetensors"))
    b = load_file(str(tmp_path / "ta" / ta["run_id"] / "task_vectors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["ita", "iel"])
@pytest.mark.parametrize("tuning", ["full", "lora", "ia3"])
def test_runs_end_to_end_in_every_tuning_style(strategy, tuning, tmp_path):
    path, rec = run(config(strategy, tuning=tuning), runs_dir=tmp_path, progress=False)
    m = rec["accuracy_matrix"]
    assert len(m) == 3 and all(0 <= a <= 1 for row in m for a in row)
    assert rec["metrics"]["final_average_accuracy"] > 1 / 6  # above chance over the 6 classes
    extras = rec["strategy_extras"]
    assert extras["method"] == strategy and len(extras["preparation"]) == 3
    assert all("fisher_s" in p for p in extras["preparation"])
    # the strategy's phases after the preparation are timed apart too (the default proximal step, alignment on)
    assert all(p["align_trained_s"] > 0 and p["regularizer_step_s"] > 0 for p in extras["preparation"])
    diag = extras["diagnostics"]
    assert [d["tasks"] for d in diag] == [1, 2, 3]
    assert len(diag[-1]["tau_norm"]) == 3 and len(diag[-1]["cosine"]) == 3 and diag[-1]["fisher_spread"] >= 0
    assert diag[0]["jensen_gap"] == pytest.approx(0.0, abs=1e-6)  # one task: the composed model is the individual one
    assert (path.parent / "task_vectors.safetensors").is_file() and rec["artifacts"] == ["task_vectors.safetensors"]


def test_task_arithmetic_chooses_lambda_on_validation_data(tmp_path):
    _, rec = run(
        config("task-arithmetic", composition="sum", lambda_grid=[0.3, 0.6, 1.0]), runs_dir=tmp_path, progress=False
    )
    lambdas = rec["strategy_extras"]["lambda"]
    assert [d["experience"] for d in lambdas] == [0, 1, 2]
    assert all(d["lambda"] in (0.3, 0.6, 1.0) and 0 <= d["val_accuracy"] <= 1 for d in lambdas)
    # validation data is held out of training: 10 % of each experience (96, 72, 72 examples), accumulated
    assert [d["val_examples"] for d in lambdas] == [10, 17, 24]


def test_ita_run_is_deterministic(tmp_path):
    _, a = run(config("ita", fisher="sampled"), runs_dir=tmp_path / "a", progress=False)
    _, b = run(config("ita", fisher="sampled"), runs_dir=tmp_path / "b", progress=False)
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["strategy_extras"]["diagnostics"] == b["strategy_extras"]["diagnostics"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("alpha", -1, "alpha must be >= 0"),
        ("tuning", "dora", "tuning must be one of full, lora, ia3"),
        ("rank", 0, "rank must be >= 1"),
        ("fisher", "empirical", "fisher must be one of exact, topk, sampled"),
    ],
)
def test_invalid_hyperparameters_are_clear_errors(option, value, message):
    from clcompose.strategies.core.registry import STRATEGIES, ConfigError

    with pytest.raises(ConfigError, match=message):
        STRATEGIES["ita"].options.from_dict({option: value})
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        STRATEGIES["iel"].options.from_dict({"beta": -0.1})


def preset_config(strategy: str, **options) -> dict:
    """The reference preset on digits: batch 2 so that an epoch holds two virtual batches of 16 (+1)."""
    cfg = json.loads(json.dumps(DIGITS))
    cfg["strategy"] = strategy
    cfg["strategy_options"] = {"preset": "reference", "rank": 2, "diagnostics_examples": 20} | options
    cfg["train"] = cfg["train"] | {"batch_size": 2}
    return cfg


@pytest.mark.parametrize(
    "strategy, tuning", [("ita", "full"), ("ita", "lora"), ("ita", "ia3"), ("iel", "lora"), ("task-arithmetic", "lora")]
)
def test_preset_reference_runs_end_to_end(strategy, tuning, tmp_path):
    _, rec = run(preset_config(strategy, tuning=tuning), runs_dir=tmp_path, progress=False)
    opts = rec["config"]["strategy_options"]
    assert opts["preset"] == "reference" and opts["reg_step"] == "decoupled" and opts["fisher"] == "exact"
    assert rec["config"]["train"]["virtual_batch"] is None  # left to the preset, which resolved it:
    extras = rec["strategy_extras"]
    assert extras["virtual_batch"] == 16 and extras["virtual_batch_quirk"] is True
    # per experience ~72 (or 96) examples = 36 (48) mini-batches: steps after 17 and 33, two epochs
    assert all(n in (4, 6) for n in extras["optimizer_steps"]) and len(extras["optimizer_steps"]) == 3
    assert [s["experience"] for s in extras["stability"]] == [0, 1, 2]
    # (task arithmetic under the preset: random heads never aligned, so only validity is asserted)
    assert rec["metrics"]["final_average_accuracy"] > (1 / 6 if strategy != "task-arithmetic" else 0)


@pytest.mark.parametrize("strategy, tuning", [("ita", "full"), ("ita", "lora"), ("ita", "ia3"), ("iel", "lora")])
def test_proximal_regulariser_step_runs_and_stays_bounded_at_a_huge_strength(strategy, tuning, tmp_path):
    strength = {"alpha": 1e4} if strategy == "ita" else {"beta": 1e4}
    _, prox = run(config(strategy, tuning=tuning, reg_step="proximal", **strength), runs_dir=tmp_path, progress=False)
    extras = prox["strategy_extras"]
    assert max(s["stability"] for s in extras["stability"]) > 2  # the explicit step would be unstable here
    assert extras["warnings"] == []  # … but it is not the step in use
    assert all(math.isfinite(n) and n < 10 for n in extras["diagnostics"][-1]["tau_norm"])
    assert prox["metrics"]["final_average_accuracy"] > 1 / 6


def test_an_unstable_explicit_step_warns_once_in_log_and_record(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="clcompose.task_vectors"):
        _, rec = run(config("ita", tuning="full", reg_step="decoupled", alpha=1e4), runs_dir=tmp_path, progress=False)
    stab = rec["strategy_extras"]["stability"]
    assert stab[0]["stability"] < 1 < 2 < stab[1]["stability"]  # experience 0: F̂ = ε only
    warnings = rec["strategy_extras"]["warnings"]
    assert len(warnings) == 1 and "experience 1" in warnings[0] and "stability number" in warnings[0]
    assert [r.getMessage() for r in caplog.records if "stability number" in r.getMessage()] == warnings


def test_a_virtual_batch_is_refused_by_strategies_that_do_not_accumulate(tmp_path):
    from clcompose.strategies.core.registry import ConfigError

    cfg = config("ita") | {"strategy": "naive", "strategy_options": {}}
    cfg["train"] = cfg["train"] | {"virtual_batch": 4}
    with pytest.raises(ConfigError, match="virtual_batch"):
        run(cfg, runs_dir=tmp_path, progress=False)


def test_resume_of_a_preset_reference_run_is_identical(tmp_path, monkeypatch):
    from tests.test_resume import Killed, kill_after

    cfg = preset_config("ita", tuning="lora", reg_step="proximal")
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    with monkeypatch.context() as m:
        kill_after(m, 1)
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    _, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert resumed["resumes"] and resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    for key in ("diagnostics", "stability", "optimizer_steps"):
        assert resumed["strategy_extras"][key] == reference["strategy_extras"][key]
