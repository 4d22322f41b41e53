"""Sweeps on a real one-node SLURM cluster (slurm/start_cluster.sh), submitted through submitit.

They need root (the cluster's daemons, munge, /etc/slurm); in CI (CI=true, as root) they must run, elsewhere
they are skipped without root. The cluster is started once for this module and stopped at the end, unless it
was already running before (then whoever started it stops it). Every test uses its own run folder, so its
submitit folder is fresh (stale result pickles are impossible even when job ids restart after a reset).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clcompose.bench.io import read_json
from clcompose.bench.sweeps import store
from clcompose.bench.sweeps.launch import submit
from clcompose.bench.sweeps.sweep import load_sweep
from tests.conftest import IN_CI

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
START, STOP = REPO / "slurm" / "start_cluster.sh", REPO / "slurm" / "stop_cluster.sh"

TINY = """
name: tiny
seeds: [0]
benchmarks: {split-digits: {n_experiences: 5, per_class: 40}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1, input_size: 16}}
strategies: {naive: {}}
train: {epochs: 1, batch_size: 16, lr: 0.01}
"""
SLOW = TINY.replace("naive: {}", "ewc: {}").replace("epochs: 1,", "epochs: 15,")  # about 2 s per experience


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the SLURM tests must run in CI, and need root there")
        pytest.skip("starts a real SLURM cluster: needs root (run the suite as root, as CI does)")
    deadline = time.monotonic() + 600  # the scripts may still be on their way (written concurrently)
    while not (START.exists() and STOP.exists()):
        if time.monotonic() > deadline:
            pytest.fail(f"{START} / {STOP} do not exist")
        time.sleep(5)
    t = time.monotonic()
    r = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        pytest.fail(f"start_cluster.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    conf = re.findall(r"^export SLURM_CONF=(\S+)$", r.stdout, re.M)
    assert conf, r.stdout
    already_running = "already running" in r.stdout
    print(f"\ncluster ready in {time.monotonic() - t:.1f} s ({'already running' if already_running else 'started'})")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf[-1])
        yield conf[-1]
    if not already_running:
        t = time.monotonic()
        r = subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        print(f"cluster stopped in {time.monotonic() - t:.1f} s")
        assert r.returncode == 0, r.stderr[-3000:]


def bench(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clcompose.bench", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def problem_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("bench: ")]


def profile(tmp_path: Path, **overrides) -> Path:
    """The CI profile with some fields changed, as a file of its own."""
    import yaml

    data = yaml.safe_load((REPO / "slurm" / "profiles" / "ci.yaml").read_text()) | overrides
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_step(cell, at_least: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = read_json(cell.run_dir / store.RUNNING) or {}
        if info.get("step") and info["step"][0] >= at_least:
            return info
        assert time.monotonic() < deadline, f"{cell.label} did not reach experience {at_least}"
        time.sleep(0.1)


def reference(cell, tmp_path: Path) -> dict:
    from clcompose.bench.runs.run import run

    return run(cell.config, runs_dir=tmp_path / "reference", progress=False)[1]


def test_sweep_runs_every_cell_as_a_job_array_and_a_rerun_submits_only_missing(cluster, tmp_path):
    runs = tmp_path / "runs"
    sweep_file = str(REPO / "examples" / "sweep-digits.yaml")
    r = bench("sweep", sweep_file, "--executor", "slurm", "--profile", "ci", "--runs-dir", str(runs), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 cells: 10 run now, 0 already done, 0 failed" in r.stdout
    recs = [json.loads(p.read_text()) for p in runs.rglob("record.json")]
    assert len(recs) == 10
    array_ids = {rec["environment"]["job_id"].split("_")[0] for rec in recs}
    assert len(array_ids) == 1 and all(
        re.fullmatch(r"\d+_[0-4]", rec["environment"]["job_id"]) for rec in recs
    )  # one array, 5 tasks
    assert all(rec["environment"]["torch_threads"] == 1 for rec in recs)

    r = bench("aggregate", str(runs), "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "10 records" in r.stdout, r.stderr
    table = (tmp_path / "out" / "tables" / "split-digits.md").read_text()
    for variant in ("naive", "lwf", "joint", "ewc (ewc_lambda=10)", "ewc (ewc_lambda=1000)"):
        assert re.search(rf"^\| {re.escape(variant)} \| 2 \|", table, re.M), table  # every cell, both seeds

    sweep = load_sweep(sweep_file, profile="ci", runs_dir=runs)
    for cell in sweep.cells[3:5]:  # as if these two had been lost
        cell.record_path.unlink()
    r = bench("sweep", sweep_file, "--executor", "slurm", "--profile", "ci", "--runs-dir", str(runs), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "10 cells: 2 run now, 8 already done, 0 failed" in r.stdout
    new_jobs = {read_json(c.run_dir / store.JOB)["job_id"] for c in sweep.cells[3:5]}
    assert len(new_jobs) == 1 and new_jobs.pop().split("_")[0] not in array_ids  # one new job for the two
    r = bench("status", sweep_file, "--profile", "ci", "--runs-dir", str(runs))
    assert "10 cells: 10 done, 0 running, 0 failed, 0 missing" in r.stdout, r.stdout


def test_timeout_signal_requeues_and_the_run_resumes_identically(cluster, tmp_path):
    (tmp_path / "s.yaml").write_text(SLOW)
    sweep = load_sweep(tmp_path / "s.yaml", profile="ci", runs_dir=tmp_path / "runs")
    (cell,) = sweep.cells
    t = time.monotonic()
    (job,), _ = submit(sweep, "slurm", sweep.cells)
    wait_for_step(cell, 2)
    job._interrupt(timeout=True)  # USR2, as SLURM sends it before the time limit: checkpoint() and requeue
    outcomes = job.result()  # submitit follows the job through its requeue
    assert [o["status"] for o in outcomes] == ["done"]
    print(f"interrupted, requeued and finished in {time.monotonic() - t:.1f} s")
    rec = json.loads(cell.record_path.read_text())
    assert rec["resumes"][0]["from_step"] >= 2 and rec["environment"]["job_id"] == str(job.job_id)
    ref = reference(cell, tmp_path)
    assert rec["accuracy_matrix"] == ref["accuracy_matrix"] and rec["metrics"] == ref["metrics"]
    log = Path(job.paths.stdout).read_text()
    assert (
        "Caught signal SIGUSR2 on" in log and "this job is timed-out" in log and f"Requeued job {job.job_id}" in log
    ), log[-3000:]
    assert log.count("Starting with JobEnvironment") == 2, log[-3000:]


def test_a_killed_job_is_one_line_and_the_rerun_resumes(cluster, tmp_path):
    """kill -9 of the job's Python process (as the OOM killer would), then the same sweep again."""
    (tmp_path / "s.yaml").write_text(SLOW)
    args = [
        "sweep",
        str(tmp_path / "s.yaml"),
        "--executor",
        "slurm",
        "--profile",
        "ci",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--quiet",
    ]
    (cell,) = load_sweep(tmp_path / "s.yaml", profile="ci", runs_dir=tmp_path / "runs").cells
    proc = subprocess.Popen(
        [sys.executable, "-m", "clcompose.bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    info = wait_for_step(cell, 1)
    os.kill(info["pid"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert len(lines) == 1, err[-3000:]
    assert re.match(
        rf"bench: lost: split-digits small-cnn ewc s0 \[\w{{10}}\]: job {info['job_id']} ended without finishing its runs "
        r"\(state: [A-Z_]+.*\); log: \S+; \d/5 experiences are checkpointed, re-run the sweep to resume$",
        lines[0],
    ), lines[0]
    state = store.cell_state(cell.run_dir)
    assert state.state == "failed" and state.detail.startswith(f"interrupted: pid {info['pid']}"), state

    from clcompose.bench.cli.main import main

    assert main([*args[:3], "debug", *args[4:]]) == 0  # the re-run, here in this process, resumes the checkpoint
    rec = json.loads(cell.record_path.read_text())
    assert (
        rec["resumes"][0]["from_step"] >= 1 and len(rec["accuracy_matrix"]) == 5
    )  # (identical metrics: see the test above)


def test_a_cancelled_job_is_one_line(cluster, tmp_path):
    """scancel while the job waits in the queue (held), so that it can never finish first."""
    (tmp_path / "s.yaml").write_text(TINY)
    prof = profile(tmp_path, additional={"hold": True})  # sbatch --hold: pending until released
    args = [
        "sweep",
        str(tmp_path / "s.yaml"),
        "--executor",
        "slurm",
        "--profile",
        str(prof),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--quiet",
    ]
    (cell,) = load_sweep(tmp_path / "s.yaml", profile=str(prof), runs_dir=tmp_path / "runs").cells
    proc = subprocess.Popen(
        [sys.executable, "-m", "clcompose.bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while not (cell.run_dir / store.JOB).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    job_id = read_json(cell.run_dir / store.JOB)["job_id"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clcompose.bench",
            "status",
            str(tmp_path / "s.yaml"),
            "--profile",
            str(prof),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert re.search(rf"^  running .*\(job {job_id} pending\)", r.stdout, re.M), r.stdout  # queued counts as running
    subprocess.run(["scancel", job_id], check=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, (out, err[-3000:])
    (line,) = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert re.match(
        rf"bench: lost: split-digits small-cnn naive s0 \[\w{{10}}\]: job {job_id} ended without finishing its runs "
        r"\(state: CANCELLED.*\); log: \S+; re-run the sweep to run it$",
        line,
    ), line


def test_a_run_that_raises_and_a_job_that_dies_are_one_line_each(cluster, tmp_path):
    (tmp_path / "s.yaml").write_text(TINY)
    # the run raises inside its job: the profile puts runs on a GPU, the node has none
    r = bench(
        "sweep",
        str(tmp_path / "s.yaml"),
        "--executor",
        "slurm",
        "--profile",
        str(profile(tmp_path, device="cuda")),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--quiet",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    (line,) = problem_lines(r)
    assert re.match(
        r"bench: failed: split-digits small-cnn naive s0 \[\w{10}\]: ConfigError: device 'cuda' requested but CUDA is not "
        r"available here \(traceback: \S+failed\.json\)$",
        line,
    ), line
    # the job dies before Python starts (its set-up fails): no result, SLURM says FAILED
    r = bench(
        "sweep",
        str(tmp_path / "s.yaml"),
        "--executor",
        "slurm",
        "--profile",
        str(profile(tmp_path, setup=["exit 3"])),
        "--runs-dir",
        str(tmp_path / "runs2"),
        "--quiet",
    )
    assert r.returncode == 1, r.stderr[-3000:]
    (line,) = problem_lines(r)
    assert re.match(
        r"bench: lost: split-digits small-cnn naive s0 \[\w{10}\]: job \d+ ended without finishing its runs \(state: FAILED.*\); "
        r"log: \S+; re-run the sweep to run it$",
        line,
    ), line


def test_gpus_on_a_node_without_any_is_one_clear_line(cluster, tmp_path):
    (tmp_path / "s.yaml").write_text(TINY)
    r = bench(
        "sweep",
        str(tmp_path / "s.yaml"),
        "--executor",
        "slurm",
        "--profile",
        str(profile(tmp_path, gpus_per_node=1)),
        "--runs-dir",
        str(tmp_path / "runs"),
    )
    assert r.returncode == 2, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    assert re.match(
        r"bench: error: sbatch refused the jobs of sweep tiny \(profile profile: partition=debug, gpus_per_node=1, .*\): "
        r".*(Requested node configuration is not available|Invalid generic resource)",
        lines[0],
    ), lines[0]
    assert not list((tmp_path / "runs").rglob(store.JOB))  # nothing was submitted
