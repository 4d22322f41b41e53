"""The store heals itself (issue 16): damaged records are moved aside and re-run, a record that cannot be written
fails its cell only, killed writers leave nothing behind, two identical `bench run`s write one record, and a
record's ``resumes`` counts every attempt."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.io import write_json_atomic
from clcompose.bench.runs import checkpoint
from clcompose.bench.runs import run as run_module
from clcompose.bench.runs.folder import CellLock, record_problem
from clcompose.bench.runs.run import run
from clcompose.bench.sweeps import store
from clcompose.bench.sweeps.launch import SweepWorker, Task, launch
from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.bench.sweeps.worker import run_cell
from clcompose.strategies.core.registry import ConfigError
from tests.test_hardening import TINY, one_error_line, write
from tests.test_resume import CONFIG, Killed, kill_after

REPO = Path(__file__).resolve().parent.parent
DAMAGE = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not-a-record": lambda text: '{"hello": "world"}\n',
    "still-running": lambda text: json.dumps(json.loads(text) | {"status": "running"}),
    "binary": lambda text: "\x00\x01\x02",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-cell sweep (naive, ewc; seed 0) run by the debug executor."""
    folder = tmp_path_factory.mktemp("finished")
    path = write(folder, TINY)
    sweep = load_sweep(path, runs_dir=folder / "runs")
    report = launch(sweep, "debug", progress=False)
    assert report.ok and report.count("done") == 2, report.problems()
    return path, folder / "runs"


def copy_store(finished, tmp_path):
    path, runs = finished
    shutil.copytree(runs, tmp_path / "runs")
    return path, tmp_path / "runs", load_sweep(path, runs_dir=tmp_path / "runs")


def lines(text: str, prefix: str = "bench: ") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------- damaged records


@pytest.mark.parametrize(
    "damage", ["truncated", "empty", pytest.param("not-a-record", marks=pytest.mark.slow), "still-running", "binary"]
)
def test_a_damaged_record_is_moved_aside_and_the_cell_runs_again(damage, finished, tmp_path, capsys):
    path, runs, sweep = copy_store(finished, tmp_path)
    cell = sweep.cells[1]
    original = json.loads(cell.record_path.read_text())
    damaged = DAMAGE[damage](cell.record_path.read_text())
    cell.record_path.write_text(damaged)
    assert record_problem(cell.record_path) is not None

    # status, dry-run and the real re-run agree: the cell is failed and would run
    assert main(["status", str(path), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "1 done, 0 running, 1 failed, 0 missing" in out
    assert re.search(r"failed +split-digits small-cnn ewc s0 .*record\.json is .*a re-run moves it aside", out), out
    assert main(["sweep", str(path), "--dry-run", "--runs-dir", str(runs)]) == 0
    assert "would run 1 cell(s)" in capsys.readouterr().out

    assert main(["sweep", str(path), "--executor", "debug", "--runs-dir", str(runs), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "2 cells: 1 run now, 1 already done, 0 failed" in out, out
    (repaired,) = lines(err)
    assert repaired.startswith("bench: repaired: split-digits small-cnn ewc s0 [") and "moved aside to " in repaired
    (kept,) = cell.run_dir.glob("record.json.corrupt-*")
    assert kept.read_text() == damaged and str(kept) in repaired  # kept for a human, never deleted
    healed = json.loads(cell.record_path.read_text())
    assert healed["accuracy_matrix"] == original["accuracy_matrix"] and healed["config_hash"] == cell.hash
    assert store.cell_state(cell.run_dir).state == "done"


@pytest.mark.parametrize("finish_at", range(6))
def test_a_cell_that_finishes_while_its_state_is_read_reads_as_running_or_done(
    finish_at, finished, tmp_path, monkeypatch
):
    """The worker writes its record, removes running.json and exits at any point while cell_state looks (CI saw
    a second sweep report such a cell as lost: it read the record before the holder)."""
    import pathlib

    _, _, sweep = copy_store(finished, tmp_path)
    cell = sweep.cells[0]
    record_text = cell.record_path.read_text()
    cell.record_path.unlink()
    write_json_atomic(cell.run_dir / store.RUNNING, store.whoami())
    looks, ended = [0], [False]

    def finish_maybe():
        if looks[0] == finish_at and not ended[0]:
            cell.record_path.write_text(record_text)
            (cell.run_dir / store.RUNNING).unlink()
            ended[0] = True
        looks[0] += 1

    real_exists, real_read, real_alive = pathlib.Path.exists, store.read_json, store.is_alive

    def exists(self, *a, **k):
        finish_maybe()
        return real_exists(self, *a, **k)

    def read(path, *a, **k):
        finish_maybe()
        return real_read(path, *a, **k)

    def alive(holder):
        finish_maybe()
        return False if ended[0] else real_alive(holder)

    monkeypatch.setattr(pathlib.Path, "exists", exists)
    monkeypatch.setattr(store, "read_json", read)
    monkeypatch.setattr(store, "is_alive", alive)
    state = store.cell_state(cell.run_dir).state
    assert state in ("running", "done"), (finish_at, state)


def test_bench_run_heals_a_damaged_record_in_the_store_but_never_touches_an_explicit_out(finished, tmp_path, capfd):
    path, runs, sweep = copy_store(finished, tmp_path)
    cell = sweep.cells[0]
    cell.record_path.write_text('{"schema": 1, "metr')
    record_path, rec = run(cell.config, runs_dir=runs, progress=False)
    assert record_path == cell.record_path and record_problem(record_path) is None
    assert "moved it aside to record.json.corrupt-" in capfd.readouterr().err
    assert len(list(cell.run_dir.glob("record.json.corrupt-*"))) == 1
    mine = tmp_path / "mine.json"
    mine.write_text("{ half")
    with pytest.raises(ConfigError, match="already exists; records are never overwritten"):
        run(cell.config, out=mine, progress=False)
    assert mine.read_text() == "{ half" and not list(tmp_path.glob("mine.json.corrupt-*"))


# --------------------------------------------------------------------------- failures stay inside their cell


def tasks_of(sweep) -> list[Task]:
    return [Task.of(c) for c in sweep.cells]


def test_a_record_that_cannot_be_written_fails_only_its_cell(tmp_path, monkeypatch):
    sweep = load_sweep(write(tmp_path, TINY), runs_dir=tmp_path / "runs")
    import clcompose.bench.sweeps.worker as worker

    real_execute = worker.execute

    def non_finite_for_naive(resolved, **kwargs):
        record = real_execute(resolved, **kwargs)
        if resolved.config.strategy == "naive":
            record["metrics"]["bwt"] = float("nan")  # e.g. a diverged run's metric
        return record

    monkeypatch.setattr(worker, "execute", non_finite_for_naive)
    naive, ewc = SweepWorker()(tasks_of(sweep))  # one worker, both cells: the first failure must not stop it
    assert naive["status"] == "failed" and ewc["status"] == "done", (naive, ewc)
    assert naive["error"].startswith("NonFiniteError: ") and "at metrics.bwt; JSON has none" in naive["error"]
    cell = sweep.cells[0]
    failed = json.loads((cell.run_dir / "failed.json").read_text())
    assert failed["error"] == naive["error"] and "Traceback" in failed["traceback"]
    assert not cell.record_path.exists() and store.cell_state(cell.run_dir).state == "failed"
    assert sweep.cells[1].record_path.is_file()


def test_an_unexpected_error_outside_the_run_fails_only_its_cell(tmp_path, monkeypatch):
    sweep = load_sweep(write(tmp_path, TINY), runs_dir=tmp_path / "runs")
    import clcompose.bench.sweeps.launch as launch_module

    real = launch_module.run_cell

    def broken_for_naive(config, *args, **kwargs):
        if config["strategy"] == "naive":
            raise RuntimeError("something outside the per-cell handling")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(launch_module, "run_cell", broken_for_naive)
    naive, ewc = SweepWorker()(tasks_of(sweep))
    assert naive["status"] == "failed" and "RuntimeError: something outside" in naive["error"]
    assert ewc["status"] == "done"


@pytest.fixture()
def frozen_cell(tmp_path):
    """The first cell's run folder, made unwritable (chattr +i as root)."""
    sweep = load_sweep(write(tmp_path, TINY), runs_dir=tmp_path / "runs")
    folder = sweep.cells[0].run_dir
    folder.mkdir(parents=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
    else:
        folder.chmod(0o555)
    yield sweep
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_an_unwritable_cell_folder_fails_that_cell_and_the_sweep_goes_on(frozen_cell, tmp_path, capsys):
    sweep = frozen_cell
    code = main(["sweep", str(sweep.path), "--executor", "debug", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and "2 cells: 1 run now, 0 already done, 1 failed" in out, (out, err)
    (line,) = lines(err)
    assert re.match(r"bench: failed: split-digits small-cnn naive s0 \[\w{10}\]: cannot write the run folder: ", line)
    assert sweep.cells[1].record_path.is_file()


# --------------------------------------------------------------------------- leftovers and locks


def test_stale_temporaries_of_dead_writers_are_cleaned(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY.replace(", ewc: {}", "")), runs_dir=tmp_path / "runs")
    (cell,) = sweep.cells
    cell.run_dir.mkdir(parents=True)
    stale = [".checkpoint.pt.99999999.tmp", ".record.json.4242.tmp", ".running.json.7.tmp", ".checkpoint.json.8.tmp"]
    for name in stale:
        (cell.run_dir / name).write_bytes(b"")
    (cell.run_dir / ".notes.txt.5.tmp").write_text("not ours")  # not a file the cell writes: kept
    assert run_cell(cell.config, cell.hash, cell.run_dir)["status"] == "done"
    assert sorted(p.name for p in cell.run_dir.glob(".*.tmp")) == [".notes.txt.5.tmp"]


KILL_IN_CHECKPOINT = """
import json, os, signal, sys
import torch
from clcompose.bench.runs.run import run

real_save, calls = torch.save, []

def save_and_die(obj, f, *args, **kwargs):
    calls.extend([1] if ".checkpoint.pt." in str(f) else [])
    if len(calls) == 2:  # the second checkpoint: killed while its temporary file is half written
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_and_die
run(json.loads(sys.argv[1]), out=sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_a_kill_during_checkpointing_leaves_nothing_after_the_next_run(tmp_path):
    cfg = CONFIG | {"strategy": "naive"}
    out = tmp_path / "cell" / "record.json"
    r = subprocess.run(
        [sys.executable, "-c", KILL_IN_CHECKPOINT, json.dumps(cfg), str(out)], capture_output=True, timeout=600
    )
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    leftovers = [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt."), leftovers  # what the kill left
    _, rec = run(cfg, out=out, progress=False)
    assert [r["from_step"] for r in rec["resumes"]] == [1]
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock", "record.json"]  # no .tmp, no checkpoint


def test_a_busy_cell_is_one_line_for_bench_run(tmp_path, capsys):
    from tests.test_hardening import RUN

    runs = tmp_path / "runs"
    assert main([*RUN, "--runs-dir", str(runs)]) == 0
    (folder,) = runs.iterdir()
    (folder / "record.json").unlink()
    lock = CellLock(folder)
    assert lock.acquire()
    write_json_atomic(folder / "running.json", {"host": "elsewhere", "pid": 4242}, overwrite=True)
    capsys.readouterr()
    try:
        assert main([*RUN, "--runs-dir", str(runs)]) == 2
    finally:
        lock.release()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.match(r"bench: error: .* is being run by pid 4242 on elsewhere right now", err[0])
    assert not (folder / "record.json").exists() and (folder / "running.json").exists()  # the holder's, untouched


@pytest.mark.slow
def test_two_identical_bench_runs_at_once_write_one_record_and_leave_nothing(tmp_path):
    cfg = CONFIG | {"strategy": "ewc", "train": CONFIG["train"] | {"epochs": 6}}
    (tmp_path / "run.yaml").write_text(json.dumps(cfg))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "clcompose.bench", "run", "--config", str(tmp_path / "run.yaml")]
    cmd += ["--runs-dir", str(runs), "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-1500:]) for p, _, err in results]
    (loser,) = [r for r in results if r[0].returncode == 2]
    line = one_error_line(subprocess.CompletedProcess([], 2, loser[1], loser[2]))
    # the loser finds the cell locked (its holder named once running.json is written, not before) or the record written
    assert re.search(r"is being run( by pid \d+ on \S+)? right now", line) or "already exists" in line, line
    (folder,) = runs.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "record.json"]  # no checkpoint, .tmp, running.json


def test_resumes_count_attempts_killed_before_their_next_checkpoint(tmp_path, monkeypatch):
    cfg = CONFIG | {"strategy": "naive"}
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    out = tmp_path / "cell" / "record.json"

    def dies_before_training(*args, **kwargs):
        raise Killed("killed during its first experience")

    with monkeypatch.context() as m:  # attempt 1: killed while it sets up (builds the stream, the backbone)
        m.setattr(run_module._Session, "build", dies_before_training)
        with pytest.raises(Killed):
            run(cfg, out=out, progress=False)
    with monkeypatch.context() as m:  # attempt 2: killed before its first checkpoint
        m.setattr(run_module, "_train", dies_before_training)
        with pytest.raises(Killed):
            run(cfg, out=out, progress=False)
    with monkeypatch.context() as m:  # attempt 3: checkpoints two experiences, then killed
        kill_after(m, 2)
        with pytest.raises(Killed):
            run(cfg, out=out, progress=False)
    with monkeypatch.context() as m:  # attempt 4: resumes, killed before its next checkpoint
        m.setattr(run_module, "_train", dies_before_training)
        with pytest.raises(Killed):
            run(cfg, out=out, progress=False)
    assert checkpoint.peek(checkpoint_path := run_module.checkpoint_path_for(out))["next_step"] == 2
    assert len(checkpoint.previous_attempts(checkpoint_path, reference["config_hash"])) == 4
    _, rec = run(cfg, out=out, progress=False)  # attempt 5 finishes
    assert [r["from_step"] for r in rec["resumes"]] == [0, 0, 2, 2]
    assert all(r["at"] and r["host"] for r in rec["resumes"])
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and rec["metrics"] == reference["metrics"]
    assert not checkpoint_path.exists() and not checkpoint_path.with_suffix(".json").exists()


def test_a_table_write_that_fails_halfway_leaves_the_old_table_whole(tmp_path, monkeypatch):
    """Tables and pages (leaderboards, selection, perf) are replaced atomically, like records."""
    import pandas as pd

    from clcompose.bench import io

    table = tmp_path / "tables" / "runs.csv"
    io.write_csv_atomic(table, pd.DataFrame({"a": [1, 2]}))
    before = table.read_text()

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", disk_full)
    with pytest.raises(OSError):
        io.write_csv_atomic(table, pd.DataFrame({"a": list(range(1000))}))
    assert table.read_text() == before and sorted(p.name for p in table.parent.iterdir()) == ["runs.csv"]
