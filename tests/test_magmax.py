"""MagMax's training variant: sequential fine-tuning + max-magnitude merging, through bench run."""

import pytest
import torch

from clcompose.bench.runs.run import run
from tests.test_ita_iel import config


def test_each_task_starts_from_the_previous_tasks_weights(tmp_path, monkeypatch):
    from clcompose.strategies.task_vectors.magmax import MagMax

    starts = []
    real = MagMax._prepare_experience

    def spy(self):
        real(self)
        starts.append([p.detach().clone() for p in self.pool.task_parameters(self.task)])
        if self.task > 0:
            previous = self.pool.task_parameters(self.task - 1)
            assert all(torch.equal(p, q) for p, q in zip(starts[-1], previous))

    monkeypatch.setattr(MagMax, "_prepare_experience", spy)
    _, rec = run(config("magmax", tuning="full"), runs_dir=tmp_path, progress=False)
    assert len(starts) == 3 and not torch.equal(starts[1][0], starts[2][0])  # each experience moved on from there
    extras = rec["strategy_extras"]
    assert extras["method"] == "magmax" and [d["experience"] for d in extras["lambda"]] == [0, 1, 2]
    assert rec["metrics"]["final_average_accuracy"] > 1 / 6


@pytest.mark.parametrize("strategy, k", [("magmax", 2), ("tmc", 1), ("task-arithmetic", 2)])
def test_resume_after_a_kill_is_identical(strategy, k, tmp_path, monkeypatch):
    from tests.test_resume import Killed, kill_after

    options = {"composition": "ties", "ties_density_grid": [0.2, 0.5]} if strategy == "task-arithmetic" else {}
    cfg = config(strategy, **options)
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    with monkeypatch.context() as m:
        kill_after(m, k)
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    torch.manual_seed(999)
    _, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert resumed["resumes"] and resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    for key in ("diagnostics", "lambda", "optimizer_steps"):
        assert resumed["strategy_extras"][key] == reference["strategy_extras"][key]


def test_new_strategies_appear_in_the_leaderboard(tmp_path):
    from clcompose.bench.report.aggregate import load_results, summary_table

    for name in ("magmax", "tmc"):
        run(config(name), runs_dir=tmp_path, progress=False)
    run(config("ita", composition="ties"), runs_dir=tmp_path, progress=False)
    run(config("ita"), runs_dir=tmp_path, progress=False)
    results = load_results([tmp_path])
    table = summary_table(results, "split-digits")
    labels = set(table["label"])
    assert {"magmax", "tmc"} <= labels and "ita (composition=ties)" in labels and "ita (composition=average)" in labels
