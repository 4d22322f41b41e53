"""Skills: coefficient edits by hand, task-vector save/load, and the skills report over a finished run."""

import argparse
import json

import pytest

from clcompose.bench.runs.run import run
from clcompose.strategies.task_vectors.skills import specialize_coefficients, unlearn_coefficients
from tests.test_ita_iel import config


def test_unlearning_and_specialisation_coefficients():
    c = [0.25] * 4
    assert unlearn_coefficients(c, 1, "drop") == [0.25, 0.0, 0.25, 0.25]
    assert unlearn_coefficients(c, 1, "negate") == [0.25, -0.25, 0.25, 0.25]
    assert specialize_coefficients(c, 2, 1.0) == [0.0, 0.0, 1.0, 0.0]
    assert specialize_coefficients(c, 2, 0.25) == pytest.approx(c)  # w = 1/T is the unedited model
    assert specialize_coefficients([0.6, 0.6], 0, 0.75) == pytest.approx([0.9, 0.3])  # keeps a λ-sum's mass
    with pytest.raises(ValueError):
        unlearn_coefficients(c, 4)
    with pytest.raises(ValueError):
        specialize_coefficients(c, 0, 1.5)


@pytest.fixture(scope="module")
def ita_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("skills")
    path, rec = run(config("ita"), runs_dir=folder, progress=False)
    return path.parent, rec


def test_saved_task_vectors_rebuild_the_evaluated_model(ita_run):
    from clcompose.bench.cli.skills import load_run, skills_report

    run_dir, rec = ita_run
    record, model, batches = load_run(run_dir)
    assert model.pool.num_tasks == 3 and record["run_id"] == rec["run_id"]
    rows = skills_report(model, batches, [0, 1, 2], 1.0)
    composed = {r["target"]: r["acc_target"] for r in rows if r["edit"] == "composed"}
    assert [composed[k] for k in range(3)] == pytest.approx(rec["accuracy_matrix"][-1])  # same model as evaluated
    drop = [r for r in rows if r["edit"] == "unlearn_drop"]
    assert all(r["coefficients"][r["target"]] == 0.0 for r in drop)
    spec = [r for r in rows if r["edit"] == "specialize"]
    assert all(r["coefficients"][r["target"]] == pytest.approx(1.0) for r in spec)


def test_skills_command_writes_a_report_and_refuses_to_overwrite(ita_run, capsys):
    from clcompose.bench.cli.skills import cmd_skills
    from clcompose.strategies.core.registry import ConfigError

    run_dir, _ = ita_run
    out = run_dir / "skills-test.json"
    args = argparse.Namespace(run_dir=str(run_dir), target=[1], weight=1.0, out=str(out))
    assert cmd_skills(args) == 0
    report = json.loads(out.read_text())
    assert {r["edit"] for r in report["rows"]} == {"composed", "unlearn_drop", "unlearn_negate", "specialize"}
    assert "unlearn_drop" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        cmd_skills(args)
    with pytest.raises(ConfigError, match="not in the run"):
        cmd_skills(argparse.Namespace(run_dir=str(run_dir), target=[7], weight=1.0, out=str(run_dir / "x.json")))


def test_skills_need_a_task_vector_run(tmp_path):
    from clcompose.bench.cli.skills import load_run
    from clcompose.strategies.core.registry import ConfigError

    path, _ = run(config("naive") | {"strategy_options": {}}, runs_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="skills need one of"):
        load_run(path.parent)
    with pytest.raises(ConfigError, match="no record.json"):
        load_run(tmp_path)


@pytest.mark.slow
def test_skills_is_a_bench_verb(ita_run):
    import subprocess
    import sys

    run_dir, _ = ita_run
    out = run_dir / "skills-cli.json"
    r = subprocess.run(
        [sys.executable, "-m", "clcompose.bench", "skills", str(run_dir), "--target", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "specialize" in r.stdout and json.loads(out.read_text())["rows"][0]["target"] == 0
    r = subprocess.run(
        [sys.executable, "-m", "clcompose.bench", "skills", str(run_dir), "--weight", "3"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("bench: error: --weight must be in [0, 1]")


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_task_vector_file_is_one_line(damage, ita_run, tmp_path, capsys):
    import shutil

    from clcompose.bench.cli.main import main

    run_dir, _ = ita_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    vectors = copy / "task_vectors.safetensors"
    data = vectors.read_bytes()
    vectors.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    assert main(["skills", str(copy), "--out", str(tmp_path / "skills.json")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("bench: error: ") and "is unreadable (truncated or corrupted?)" in err[0]
    assert not (tmp_path / "skills.json").exists()
    (copy / "record.json").write_text((copy / "record.json").read_text()[:100])
    assert main(["skills", str(copy)]) == 2
    assert "is not valid JSON (truncated or corrupted?)" in capsys.readouterr().err
