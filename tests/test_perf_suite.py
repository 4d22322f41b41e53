"""``bench perf strategies|budgets|compose|fisher|scaling|cli|all`` at a tiny scale: the JSON's schema, finite ratios, the tables
(never a timing threshold)."""

import json
import math

import pytest

from clcompose.bench.cli.main import main as bench_main
from clcompose.bench.perf import suite, tables
from clcompose.bench.perf.strategies import main_job, run_config


def test_fitted_exponent_is_the_least_squares_slope_in_log_log():
    assert suite.fitted_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert suite.fitted_exponent([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    # hand-computed: x = log(1, 2, 4), y = log(2, 3, 8); b = Σ(x−x̄)(y−ȳ) / Σ(x−x̄)²
    x = [math.log(v) for v in (1, 2, 4)]
    y = [math.log(v) for v in (2, 3, 8)]
    mx, my = sum(x) / 3, sum(y) / 3
    b = sum((a - mx) * (c - my) for a, c in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert suite.fitted_exponent([1, 2, 4], [2, 3, 8]) == pytest.approx(b, abs=1e-3)
    assert suite.fitted_exponent([5], [1.0]) is None


def test_run_configs_follow_the_main_job_with_overrides():
    job = main_job()
    ita = run_config(job, "ita", 0, {"strategy_options": {"fisher": "exact"}, "train": {"epochs": 1}}, "cpu")
    assert ita["benchmark"] == job["benchmark"] and ita["backbone_options"] == job["backbone_options"]
    assert ita["strategy_options"]["fisher"] == "exact" and ita["strategy_options"]["tuning"] == "lora"
    assert ita["train"]["optimizer"] == "adamw" and ita["train"]["epochs"] == 1  # the sweep's train: override kept
    naive = run_config(job, "naive", 0, {"strategy_options": {"fisher": "exact"}}, "cpu")
    assert naive["strategy_options"] == {} and naive["train"] == job["train"]


def test_experience_rows_split_the_training_time_into_the_strategy_phases_and_the_rest():
    from clcompose.bench.perf.strategies import experience_rows

    record = {
        "timing": {"steps": [{"step": 0, "train_wall_s": 10.0, "eval_wall_s": 1.0}, {"step": 1, "train_wall_s": 4.0}]},
        "strategy_extras": {
            "preparation": [
                {
                    "experience": 0,
                    "theta0_s": 0.5,
                    "consolidation_s": 1.5,  # counted from the start of the preparation: θ0 pass included
                    "fisher_s": 2.0,
                    "prepare_s": 3.75,
                    "align_trained_s": 0.75,
                    "regularizer_step_s": 0.5,
                }
            ],
            "diagnostics_seconds": [{"tasks": 1, "seconds": 0.25}],
        },
    }
    first, second = experience_rows(record)
    assert first["consolidation_s"] == 1.0 and first["theta0_s"] == 0.5 and first["fisher_s"] == 2.0
    assert first["other_preparation_s"] == 3.75 - 1.5 - 2.0  # what the preparation did after the Fisher
    assert first["rest_s"] == 10.0 - 3.75 - 0.75 - 0.5 and first["diagnostics_s"] == 0.25
    # a strategy with no phases of its own (naive): all of the training time is the rest
    assert second["rest_s"] == 4.0 and second["fisher_s"] == second["consolidation_s"] == 0.0
    assert second["eval_wall_s"] == 0.0 and second["diagnostics_s"] == 0.0
    # the diagnostics run inside the evaluation: the evaluation proper is its wall time less theirs
    assert first["evaluation_s"] == 1.0 - 0.25 and second["evaluation_s"] == 0.0


def test_break_even_is_the_first_budget_within_the_target_of_the_base():
    from clcompose.bench.perf.budgets import break_even

    # 10 + E ≤ 1.3 (0 + E)  ⇔  E ≥ 10 / 0.3
    assert break_even((10.0, 1.0), (0.0, 1.0), 1.3) == pytest.approx(10 / 0.3)
    assert break_even((1.0, 1.0), (1.0, 1.0), 1.3) == 0.0  # within the target from the start
    assert break_even((10.0, 1.3), (0.0, 1.0), 1.3) is None  # per epoch as dear as the target allows: never
    assert break_even((10.0, 2.0), (0.0, 1.0), 1.3) is None


def test_budgets_split_each_run_into_its_fixed_and_per_epoch_parts_and_pool_them(monkeypatch):
    from clcompose.bench.perf import budgets, strategies

    calls = []

    def side_by_side(names, repeats, overrides, device, progress=True, warmup=True):  # hand-made, as measure's
        calls.append(overrides | {"warmup": warmup})
        epochs = overrides["train"]["epochs"]
        naive = {k: 0.0 for k in strategies.BREAKDOWN} | {"rest_s": 2.0 * epochs}
        ita = naive | {"theta0_s": 1.0, "fisher_s": 3.0, "align_trained_s": 1.0 + epochs / 10}  # the last is noise
        ita |= {"regularizer_step_s": 0.5 * epochs, "rest_s": 2.0 * epochs}
        out = {}
        for name, parts in (("naive", naive), ("ita", ita)):
            total = sum(parts.values())
            out[name] = {
                "train_wall_per_experience_s": total,
                "relative_to_naive": total / (2.0 * epochs),
                "fisher_per_experience_s": parts["fisher_s"],
                "final_average_accuracy": 0.5,
                "breakdown_per_experience_s": parts,
            }
        return {"summary": out}

    monkeypatch.setattr(strategies, "measure", side_by_side)
    base = {"benchmark_options": {"per_class": 3}, "train": {"batch_size": 8}}
    b = budgets.measure([2, 8], ["naive", "ita"], 1, base, progress=False)
    assert [c["train"] for c in calls] == [{"batch_size": 8, "epochs": 2}, {"batch_size": 8, "epochs": 8}]
    assert [c["warmup"] for c in calls] == [True, False]  # one warm-up for the whole process
    assert base["train"] == {"batch_size": 8}  # the caller's overrides are left alone
    ita2, ita8 = (r for r in b["rows"] if r["strategy"] == "ita")
    assert ita2["fixed_per_experience_s"] == pytest.approx(5.2) and ita2["per_epoch_s"] == pytest.approx(2.5)
    assert ita8["fixed_per_experience_s"] == pytest.approx(5.8) and ita8["relative_to_naive"] == pytest.approx(
        25.8 / 16
    )
    model = b["model"]
    assert model["naive"] == {"fixed_s": 0.0, "per_epoch_s": 2.0, "asymptotic_ratio": 1.0, "epochs_within_target": 0.0}
    # fixed: the mean of 5.2 and 5.8; per epoch: (2.5·2 + 2.5·8) / 10; 5.5 + 2.5 E ≤ 1.3 · 2 E never holds below
    # E = 5.5 / 0.1
    assert model["ita"]["fixed_s"] == pytest.approx(5.5) and model["ita"]["per_epoch_s"] == pytest.approx(2.5)
    assert model["ita"]["asymptotic_ratio"] == 1.25 and model["ita"]["epochs_within_target"] == pytest.approx(55.0)
    page = tables.markdown({"command": "bench perf budgets", "budgets": b})
    assert "## Cost against the epoch budget (2, 8 epochs per experience" in page and "| ita | 5.50 | 2.50 |" in page


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.slow
def test_bench_perf_all_at_a_tiny_scale_writes_the_json_and_the_tables(tmp_path, capsys):
    out = tmp_path / "perf"
    argv = ["perf", "all", "--out", str(out), "--strategies", "naive,ita,iel,task-arithmetic", "--per-class", "3"]
    argv += ["--test-per-class", "3", "--n-experiences", "2", "--epochs", "1", "--fisher-examples", "6"]
    argv += ["--fisher-classes", "2", "--scaling-examples", "4,8", "--scaling-experiences", "2,4"]
    argv += ["--scaling-examples-per-experience", "8", "--cli-runs", "1", "--quiet"]
    argv += ["--compose-styles", "lora,full", "--compose-tasks", "1,2", "--compose-rounds", "1"]
    argv += ["--compose-eval-batch", "4", "--budget-epochs", "1,2", "--budget-strategies", "naive,ita"]
    assert bench_main(argv) == 0
    data = json.loads((out / "perf.json").read_text())
    assert data["schema"] == suite.SCHEMA and set(suite.BENCHMARKS) <= set(data)
    summary = data["strategies"]["summary"]
    assert list(summary) == ["naive", "ita", "iel", "task-arithmetic"]
    for name, row in summary.items():
        for key in ("relative_to_naive", "fisher_share", "train_wall_per_experience_s", "theta0_per_experience_s"):
            assert math.isfinite(row[key]) and row[key] >= 0, (name, key)
    assert summary["naive"]["relative_to_naive"] == 1 and summary["naive"]["fisher_per_experience_s"] == 0
    assert summary["ita"]["fisher_per_experience_s"] > 0 and summary["ita"]["theta0_per_experience_s"] > 0
    assert len(data["strategies"]["rows"]["ita"]) == 2  # one row per experience
    for name, row in summary.items():  # the breakdown adds up to the training time (each part rounded to 1 ms)
        parts = row["breakdown_per_experience_s"]
        assert sum(parts.values()) == pytest.approx(row["train_wall_per_experience_s"], abs=4e-3), name
    ita_parts = summary["ita"]["breakdown_per_experience_s"]
    assert ita_parts["align_trained_s"] > 0 and ita_parts["regularizer_step_s"] > 0 and ita_parts["rest_s"] > 0
    assert summary["naive"]["breakdown_per_experience_s"]["rest_s"] == summary["naive"]["train_wall_per_experience_s"]
    b = data["budgets"]
    assert [(r["epochs"], r["strategy"]) for r in b["rows"]] == [(1, "naive"), (1, "ita"), (2, "naive"), (2, "ita")]
    for r in b["rows"]:  # the two parts add up to the training time (each phase rounded to 1 ms)
        whole = r["fixed_per_experience_s"] + r["per_epoch_s"] * r["epochs"]
        assert whole == pytest.approx(r["train_per_experience_s"], abs=1e-2), r
        assert (r["fixed_per_experience_s"] > 0) == (r["strategy"] == "ita"), r  # naive has no phases of its own
    assert b["model"]["naive"]["asymptotic_ratio"] == 1.0 and b["model"]["ita"]["fixed_s"] > 0
    row = data["fisher"]["rows"][0]
    assert row["examples"] == 6 and math.isfinite(row["batched_vs_floor_exact"]) and row["batched_vs_floor_exact"] > 0
    sc = data["scaling"]
    assert [r["examples"] for r in sc["fisher"]["rows"]] == [4, 8] and math.isfinite(sc["fisher"]["exponent"])
    rows = sc["experiences"]["rows"]
    assert [(r["align_epochs_per_task"], r["experiences"]) for r in rows] == [(5, 2), (5, 4), (0, 2), (0, 4)]
    for r in rows:  # eval_s is rounded to the millisecond
        n2 = r["experiences"] ** 2
        assert r["eval_per_entry_ms"] == pytest.approx(1000 * r["eval_s"] / n2, abs=0.5 / n2 + 1e-3)
        assert r["total_s"] == pytest.approx(r["train_s"] + r["eval_s"] + r["diagnostics_s"], abs=2e-3)
    for name, row in summary.items():  # evaluation proper + diagnostics = the eval wall time
        total = row["evaluation_per_experience_s"] + row["diagnostics_per_experience_s"]
        assert total == pytest.approx(row["eval_wall_per_experience_s"], abs=2e-3), name
    compose = data["compose"]
    assert [(r["style"], r["tasks"]) for r in compose["rows"]] == [("lora", 1), ("lora", 2), ("full", 1), ("full", 2)]
    for r in compose["rows"]:
        assert r["max_abs_logit_diff"] == 0.0, r  # the composed network is the plain network with those weights
        for key in ("eval_composed_s", "eval_plain_s", "materialise_s", "train_composed_s", "train_plain_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
    lora, full = compose["rows"][0], compose["rows"][2]
    assert 0 < lora["trainable_per_task"] < full["trainable_per_task"]  # rank-4 factors against dense deltas
    assert list(sc["experiences"]["exponents"]) == ["5", "0"]
    assert all(math.isfinite(v) for e in sc["experiences"]["exponents"].values() for v in e.values())
    assert {r["command"] for r in data["cli"]["rows"]} >= {"bench list", "bench --help", "bench run --help"}
    assert all(math.isfinite(v) for v in _finite_numbers(data))
    page = (out / "README.md").read_text()
    assert page == tables.markdown(data) and "| ita |" in page and "bench list" in page
    assert "Where the training time per experience goes" in page and "post-training alignment" in page
    assert "## Composed forward against a plain forward" in page and "| lora | 2 |" in page
    assert "## Cost against the epoch budget (1, 2 epochs per experience" in page
    # a section run alone replaces only its own part of the file
    assert bench_main(["perf", "cli", "--out", str(out), "--cli-runs", "1", "--quiet"]) == 0
    again = json.loads((out / "perf.json").read_text())
    assert again["strategies"] == data["strategies"] and again["scaling"] == data["scaling"] and "cli" in again
    # each section keeps the command, commit and machine that measured it; the page names the older ones
    assert again["cli"]["measured"]["command"].startswith("bench perf cli")
    assert again["strategies"]["measured"]["command"].startswith("bench perf all")
    assert set(again["strategies"]["measured"]) == {"command", "created", "code", "machine", "settings"}
    page = (out / "README.md").read_text()
    assert page.count("Measured apart, by `bench perf all") == 5 and "Measured apart, by `bench perf cli" not in page
    capsys.readouterr()


def test_bad_perf_arguments_are_one_line_errors(capsys):
    assert bench_main(["perf", "cli", "--cli-runs", "0"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --cli-runs must be >= 1")
    assert bench_main(["perf", "strategies", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    assert bench_main(["perf", "scaling", "--scaling-align-epochs-per-task", "5,all"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --scaling-align-epochs-per-task must be integers >= 0")
    assert bench_main(["perf", "compose", "--compose-styles", "lora,dora"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --compose-styles: unknown 'dora'; valid: lora, ia3, full")
    assert bench_main(["perf", "compose", "--compose-tasks", "0,5"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --compose-tasks must be integers >= 1")
    assert bench_main(["perf", "budgets", "--budget-strategies", "naive,fine-tune", "--out", "/nonexistent/x"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: unknown strategy 'fine-tune'; valid: ")
    assert bench_main(["perf", "budgets", "--budget-epochs", "0,2"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --budget-epochs must be integers >= 1")
    assert bench_main(["perf", "compose", "--compose-rounds", "0"]) == 2
    assert capsys.readouterr().err.startswith("bench: error: --compose-rounds must be >= 1")


def test_the_compose_benchmark_composes_non_zero_task_vectors_and_trains_only_the_last():
    import torch

    from clcompose.bench.perf import command, compose

    assert command.COMPOSE_STYLES == compose.STYLES  # the command line's copy (kept light for --help)
    job = main_job()
    net, plain = compose._network(job["backbone"], job["backbone_options"], "lora", 3)
    assert net.pool.num_tasks == 3 and len(net.heads.heads) == 3
    for t in range(3):
        assert all(float(d.detach().abs().max()) > 0 for d in net.pool.deltas(t).values())  # B = 0 at init: no test
        assert all(p.requires_grad == (t == 2) for p in net.pool.task_parameters(t))
    assert all(p.requires_grad for p in plain.parameters())
    base = dict(net.backbone.named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in plain.named_parameters())  # θ0 until the benchmark loads τ
