"""Experience-boundary checkpoints: a run killed after experience k and resumed gives the identical record."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clcompose.bench.runs import checkpoint
from clcompose.bench.runs.run import checkpoint_path_for, run
from clcompose.strategies.core.registry import ConfigError

CONFIG = {  # digits + a small CNN: about a second per run on one thread
    "benchmark": "split-digits",
    "backbone": "small-cnn",
    "benchmark_options": {"n_experiences": 5, "per_class": 30},
    "backbone_options": {"source": "digits", "pretrain_epochs": 1, "width": 8, "input_size": 16},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
    "seed": 4,
    "stream_seed": 1,
}


class Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def kill_after(monkeypatch, k: int) -> None:
    real_save = checkpoint.save
    calls = []

    def save_then_die(*args, **kwargs):
        out = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == k:
            raise Killed(f"killed after experience {k}")
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_die)


@pytest.mark.parametrize("strategy, k", [("naive", 2), ("ewc", 1), ("lwf", 3), ("ita", 2), ("task-arithmetic", 3)])
def test_resume_after_experience_k_is_identical(strategy, k, tmp_path, monkeypatch):
    cfg = CONFIG | {"strategy": strategy}
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    assert "resumes" not in reference

    with monkeypatch.context() as m:
        kill_after(m, k)
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    folder = next((tmp_path / "interrupted").iterdir())
    assert not (folder / "record.json").exists()
    assert checkpoint.peek(folder / "checkpoint.pt")["next_step"] == k

    import torch

    torch.manual_seed(12345)  # whatever the process did since, the checkpoint's RNG states win
    path, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["metrics"] == reference["metrics"]
    diagnostics = (reference.get("strategy_extras") or {}).get("diagnostics")
    assert (resumed.get("strategy_extras") or {}).get(
        "diagnostics"
    ) == diagnostics  # ITA's second-order diagnostics too
    assert resumed["run_id"] == reference["run_id"] and resumed["config_hash"] == reference["config_hash"]
    assert [r["from_step"] for r in resumed["resumes"]] == [k]
    assert len(resumed["timing"]["steps"]) == 5
    assert not [p.name for p in path.parent.iterdir() if "checkpoint" in p.name]  # removed once the record is written
    assert sorted(resumed.get("artifacts", [])) == sorted(
        reference.get("artifacts", [])
    )  # e.g. task vectors, saved again


def test_joint_checkpoint_after_its_single_step(tmp_path, monkeypatch):
    cfg = CONFIG | {"strategy": "joint"}
    _, reference = run(cfg, runs_dir=tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        kill_after(m, 1)  # dies after training, before the record is written
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "b", progress=False)
    _, resumed = run(cfg, runs_dir=tmp_path / "b", progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"] and resumed["resumes"][0]["from_step"] == 1


def test_unreadable_checkpoint_restarts_from_scratch(tmp_path, capfd):
    cfg = CONFIG | {"strategy": "naive"}
    _, reference = run(cfg, runs_dir=tmp_path / "a", progress=False)
    out = tmp_path / "b" / "record.json"
    ckpt = checkpoint_path_for(out)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not a checkpoint")
    _, rec = run(cfg, out=out, progress=False)
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and "resumes" not in rec
    assert "could not read checkpoint" in capfd.readouterr().err
    assert not ckpt.exists()


def test_checkpoint_of_another_config_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    with monkeypatch.context() as m:
        kill_after(m, 1)
        with pytest.raises(Killed):
            run(CONFIG | {"strategy": "naive"}, out=out, progress=False)
    with pytest.raises(ConfigError, match="belongs to another run config"):
        run(CONFIG | {"strategy": "naive", "seed": 5}, out=out, progress=False)


@pytest.mark.slow
def test_sigkilled_process_resumes_identically(tmp_path):
    """A real kill -9 of `bench run` between experiences, then the same command again."""
    cfg = CONFIG | {"strategy": "ewc", "train": CONFIG["train"] | {"epochs": 6}}
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    out = tmp_path / "killed" / "record.json"
    cmd = [
        sys.executable,
        "-m",
        "clcompose.bench",
        "run",
        "--config",
        str(tmp_path / "run.yaml"),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = checkpoint_path_for(out)
    deadline = time.monotonic() + 300
    while (checkpoint.peek(ckpt) or {}).get("next_step", 0) < 2:
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.peek(ckpt)["next_step"]
    assert not out.exists() and 2 <= killed_at < 5, killed_at

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads(out.read_text())
    assert resumed["resumes"][0]["from_step"] == killed_at
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"] and resumed["metrics"] == reference["metrics"]
    assert not ckpt.exists()
