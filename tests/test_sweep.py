"""Sweeps without SLURM: expansion and hashing, bad files, dry runs, the debug and local executors, skipping
finished cells, status, failures, a killed worker, and two sweeps writing the same cells at once."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clcompose.bench.cli.main import main
from clcompose.bench.io import read_json, write_json_atomic
from clcompose.bench.runs.run import RunConfig, config_hash, default_record_path
from clcompose.bench.sweeps import store
from clcompose.bench.sweeps.launch import launch
from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.bench.sweeps.worker import run_cell

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "sweep-digits.yaml"

TINY = """
name: tiny
seeds: [0, 1]
benchmarks: {split-digits: {n_experiences: 3, per_class: 20}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1, input_size: 16, width: 8}}
strategies: {naive: {}, joint: {}}
train: {epochs: 1, batch_size: 16, lr: 0.01}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clcompose.bench", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), r.stderr[-3000:]
    return lines[0]


def records(folder: Path) -> list[Path]:
    return sorted(folder.rglob("record.json"))


# --------------------------------------------------------------------------- definition and hashing


def test_cells_have_stable_hashes_and_folders_named_from_them(tmp_path):
    sweep = load_sweep(DIGITS, runs_dir=tmp_path)
    assert len(sweep.cells) == 2 * 5  # 2 seeds × (naive, ewc λ=10, ewc λ=1000, lwf, joint)
    hashes = [c.hash for c in sweep.cells]
    assert len(set(hashes)) == len(hashes)
    assert hashes == [c.hash for c in load_sweep(DIGITS, runs_dir=tmp_path).cells]  # stable
    for cell in sweep.cells:
        resolved = RunConfig.from_dict(cell.config).resolve()
        assert cell.hash == config_hash(resolved.to_dict())
        assert cell.run_dir == tmp_path / resolved.run_id() and cell.run_id.endswith(cell.hash[:10])
        assert default_record_path(resolved, tmp_path) == cell.record_path  # `bench run` would write the same file
    labels = [c.label for c in sweep.cells]
    assert (
        "split-digits small-cnn ewc ewc_lambda=10 s0" in labels
        and "split-digits small-cnn ewc ewc_lambda=1000 s1" in labels
    )
    assert {c.config["stream_seed"] for c in sweep.cells} == {0, 1}  # the class order follows the seed by default
    # the CI cluster profile runs the same configs (cpu, 1 thread), so finished cells carry over; 2 threads do not
    assert hashes == [c.hash for c in load_sweep(DIGITS, profile="ci", runs_dir=tmp_path).cells]
    two = write(tmp_path, "executor: local\nthreads: 2\n", "two.yaml")
    assert not set(hashes) & {c.hash for c in load_sweep(DIGITS, profile=str(two), runs_dir=tmp_path).cells}


def test_grids_and_counts(tmp_path):
    sweep = load_sweep(
        write(
            tmp_path,
            TINY.replace("seeds: [0, 1]", "seeds: 3\nstream_seed: 7").replace(
                "naive: {}", "ewc: {ewc_lambda: {grid: [1, 10]}, mode: {grid: [separate, online]}}"
            ),
            "g.yaml",
        ),
        runs_dir=tmp_path,
    )
    assert len(sweep.cells) == 3 * (4 + 1)
    assert {c.config["stream_seed"] for c in sweep.cells} == {7}
    assert {
        (c.config["strategy_options"].get("ewc_lambda"), c.config["strategy_options"].get("mode")) for c in sweep.cells
    } == {(1, "separate"), (1, "online"), (10, "separate"), (10, "online"), (None, None)}


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("strategies: [naive\n", r"sweep file .* is not valid YAML at line 2"),
        ("- a\n- list\n", r"must hold a mapping, got list"),
        (TINY + "strategys: {naive: {}}\n", r"unknown key\(s\) strategys; valid: name, "),
        (TINY.replace("seeds: [0, 1]", ""), r"seeds must be a positive count or a non-empty list"),
        (TINY.replace("seeds: [0, 1]", "seeds: [0, 0]"), r"seeds has duplicates"),
        (TINY.replace("seeds: [0, 1]", "seeds: [-1]"), r"seeds must be non-negative integers"),
        (TINY.replace("naive: {}", "nope: {}"), r"unknown strategy 'nope'; valid: .*ewc.*naive"),
        (TINY.replace("split-digits:", "split-nothing:"), r"unknown benchmark 'split-nothing'; valid: "),
        (TINY.replace("small-cnn:", "alexnet:"), r"unknown backbone 'alexnet'; valid: "),
        (
            TINY.replace("naive: {}", "ewc: {ewc_lambda: -1}"),
            r"tiny\.yaml: split-digits small-cnn ewc s0: EWCOptions\.ewc_lambda must be >= 0",
        ),
        (
            TINY.replace("naive: {}", "ewc: {ewc_lambda: [1, 10]}"),
            r"ewc_lambda must be a number.*\(for a sweep over values write ewc_lambda: \{grid: \[\.\.\.\]\}\)",
        ),
        (
            TINY.replace("naive: {}", "ewc: {ewc_lambda: {grid: []}}"),
            r"strategies\.ewc\.ewc_lambda: grid must be a non-empty list",
        ),
        (TINY.replace("naive: {}", "ewc: {ewc_lambda: {grid: [10, 10.0]}}"), r"cells .* and .* are the same run"),
        (TINY.replace("naive: {}", "naive: {lambda: 1}"), r"unknown option\(s\) lambda for strategy 'naive'"),
        (
            TINY.replace("strategies: {naive: {}, joint: {}}", "strategies: {}"),
            r"strategies must be a non-empty mapping",
        ),
        (
            TINY.replace("strategies: {naive: {}, joint: {}}", "strategies: 3"),
            r"strategies must be a non-empty mapping",
        ),
        (TINY.replace("train: {", "train: {epochz: 1, "), r"unknown option\(s\) epochz for train"),
        (TINY + "cluster: nowhere\n", r"unknown cluster profile 'nowhere'; valid: ci, cluster-gpu, local"),
        (TINY + "cluster: ./missing.yaml\n", r"cluster profile file ./missing.yaml does not exist"),
        (TINY + "cluster: ./bad-profile.yaml\n", r"bad-profile.yaml: unknown option\(s\) gpus for cluster profile"),
        (TINY + "cluster: ./bad-profile2.yaml\n", r"ClusterProfile.workers must be >= 1"),
        (TINY + "cluster: ./bad-profile3.yaml\n", r"ClusterProfile.mem_gb must be a finite number, got inf"),
        (TINY + "cluster: ./bad-profile4.yaml\n", r"ClusterProfile.timeout_min must be an integer, got nan"),
        *[
            (TINY.replace("name: tiny", f"name: {bad}"), r"name must be a plain folder name .*, got ")
            for bad in ("a/b", "'..'", "'.'", "a/../..", "/abs/path", ".hidden", "''", "-x", "3")
        ],
        (TINY + "name: other\n", r"not valid YAML at line 8: duplicate key 'name' \(first at line 2\)"),
        (TINY.replace("naive: {}", "naive: {}, naive: {}"), r"duplicate key 'naive'"),
        (TINY.replace("seeds: [0, 1]", "seeds: [0, 4294967296]"), r"seeds must be below 2\*\*32 = 4294967296"),
        (TINY + "stream_seed: 4294967296\n", r"stream_seed must be below 2\*\*32"),
        (TINY.replace("seeds: [0, 1]", "seeds: 100000"), r"expands to 200,000 cells .*add `max_cells: 200000`"),
        (TINY + "max_cells: 3\n", r"expands to 4 cells \(2 seeds\), more than max_cells = 3"),
        (TINY + "max_cells: -1\n", r"max_cells must be a positive integer"),
    ],
)
def test_malformed_sweep_files_give_one_line(text, pattern, tmp_path, capsys):
    (tmp_path / "bad-profile.yaml").write_text("executor: slurm\ngpus: 1\n")
    (tmp_path / "bad-profile2.yaml").write_text("workers: 0\n")
    (tmp_path / "bad-profile3.yaml").write_text("mem_gb: .inf\n")
    (tmp_path / "bad-profile4.yaml").write_text("timeout_min: .nan\n")
    path = write(tmp_path, text, "tiny.yaml")
    code = main(
        ["sweep", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs")]
    )  # in process: one import of everything
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("bench: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_input_as_a_command(tmp_path):
    """The real command: exit code 2 and one line on stderr (the cases above run in process)."""
    assert "sweep file nope.yaml does not exist" in one_error_line(bench("status", "nope.yaml"))
    line = one_error_line(bench("sweep", str(DIGITS), "--profile", "gpu-farm", "--dry-run"))
    assert "unknown cluster profile 'gpu-farm'" in line


def test_dry_run_prints_cells_and_sbatch_parameters(tmp_path, capsys):
    def dry(*args: str) -> str:
        assert main(["sweep", *args, "--dry-run", "--runs-dir", str(tmp_path / "runs")]) == 0
        return capsys.readouterr().out

    out = dry(str(DIGITS), "--executor", "slurm", "--profile", "ci")
    assert len(re.findall(r"^  missing ", out, re.M)) == 10
    for flag in (
        "#SBATCH --array=0-4%2",
        "#SBATCH --partition=debug",
        "#SBATCH --mem=2GB",
        "#SBATCH --time=10",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --signal=USR2@30",
        "export OMP_NUM_THREADS=1",
    ):
        assert flag in out, out
    assert "job array of 5 task(s), 2 cell(s) per task" in out

    out = dry(str(REPO / "examples" / "full-protocol.yaml"))  # its own profile: cluster-gpu
    for flag in (
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@300",
    ):
        assert flag in out, out
    assert "OMP_NUM_THREADS" not in out  # GPU runs keep torch's CPU threads
    assert len(re.findall(r"^  missing ", out, re.M)) == 3 * 2 * 6

    assert "executor local: would run 10 cell(s) in 2 worker process(es)" in dry(str(DIGITS))
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- executors


def test_debug_executor_runs_missing_cells_only(tmp_path, capsys):
    sweep = load_sweep(write(tmp_path, TINY), runs_dir=tmp_path / "runs")
    report = launch(sweep, "debug", progress=False)
    assert report.ok and report.count("done") == 4, report.problems()
    assert len(records(tmp_path / "runs")) == 4
    for cell in sweep.cells:
        rec = json.loads(cell.record_path.read_text())
        assert rec["config_hash"] == cell.hash and rec["run_id"] == cell.run_id
        assert sorted(p.name for p in cell.run_dir.iterdir() if not p.name.startswith(".")) == [
            "record.json"
        ]  # no checkpoint left
    again = launch(sweep, "debug", progress=False)
    assert again.count("already-done") == 4 and again.jobs == []
    sweep.cells[1].record_path.unlink()
    third = launch(sweep, "debug", progress=False)
    assert third.count("done") == 1 and third.count("already-done") == 3 and len(third.jobs) == 1
    assert "4 cells: 1 run now, 3 already done, 0 failed" in third.summary()


@pytest.mark.slow
def test_local_executor_status_and_aggregate(tmp_path, capsys):
    path = write(tmp_path, TINY)
    runs = tmp_path / "runs"
    r = bench("sweep", str(path), "--executor", "local", "--runs-dir", str(runs), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 cells: 4 run now, 0 already done, 0 failed" in r.stdout
    assert len(records(runs)) == 4
    for rec in map(json.loads, map(Path.read_text, records(runs))):
        assert (
            rec["environment"]["job_id"] and rec["environment"]["torch_threads"] == 1
        )  # ran in a worker job, 1 thread
    assert main(["status", str(path), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "4 cells: 4 done, 0 running, 0 failed, 0 missing" in out and len(re.findall(r"^  done ", out, re.M)) == 4, (
        out
    )
    assert main(["aggregate", str(runs), "--out", str(tmp_path / "out")]) == 0
    assert "4 records" in capsys.readouterr().out
    table = (tmp_path / "out" / "tables" / "split-digits.md").read_text()
    assert re.search(r"\| joint \| 2 \|", table) and re.search(r"\| naive \| 2 \|", table)


@pytest.mark.slow
def test_main_job_runs_the_sweep_then_the_leaderboard_and_a_rerun_skips_finished_cells(tmp_path, capsys):
    """`bench main` (the README's first command) on a tiny sweep instead of examples/default.yaml."""
    args = [
        "main",
        "--sweep",
        str(write(tmp_path, TINY)),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "results"),
        "--quiet",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 cells: 4 run now, 0 already done, 0 failed" in out and "leaderboard of 4 runs" in out
    page = (tmp_path / "results" / "README.md").read_text()
    assert (
        "## split-digits" in page
        and re.search(r"\| joint \| 2 \|", page)
        and (tmp_path / "results" / "plots" / "split-digits" / "accuracy_curve.png").is_file()
    )
    assert main(args) == 0
    assert "4 cells: 0 run now, 4 already done, 0 failed" in capsys.readouterr().out


def test_a_failing_cell_is_reported_and_the_others_finish(tmp_path, capsys):
    text = TINY.replace("source: digits", "source: {grid: [digits, no-such-data]}").replace(
        "seeds: [0, 1]", "seeds: [0]"
    )
    path = write(tmp_path, text)
    runs = tmp_path / "runs"
    code = main(["sweep", str(path), "--executor", "debug", "--runs-dir", str(runs), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1, err[-3000:]
    problems = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert len(problems) == 2, err[-3000:]  # one line per failed cell
    for line in problems:
        assert re.match(
            r"bench: failed: split-digits small-cnn (naive|joint) source=no-such-data s0 \[\w{10}\]: ConfigError: unknown dataset 'no-such-data'",
            line,
        ), line
        assert "(traceback: " in line and line.rstrip(")").endswith("failed.json")
    assert "4 cells: 2 run now, 0 already done, 2 failed" in out
    failed = json.loads(next(runs.rglob("failed.json")).read_text())
    assert "Traceback" in failed["traceback"] and failed["error"].startswith("ConfigError: unknown dataset")
    assert main(["status", str(path), "--runs-dir", str(runs)]) == 0
    assert "4 cells: 2 done, 0 running, 2 failed, 0 missing" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_worker_is_reported_and_the_rerun_resumes(tmp_path):
    text = TINY.replace("strategies: {naive: {}, joint: {}}", "strategies: {ewc: {}}").replace(
        "seeds: [0, 1]", "seeds: [0]"
    )
    text = text.replace("epochs: 1", "epochs: 8")
    path = write(tmp_path, text)
    runs = tmp_path / "runs"
    (cell,) = load_sweep(path, runs_dir=runs).cells
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clcompose.bench",
            "sweep",
            str(path),
            "--executor",
            "local",
            "--runs-dir",
            str(runs),
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 300
    while True:  # kill the worker process once it has checkpointed one experience
        info = read_json(cell.run_dir / store.RUNNING) or {}
        if info.get("step") and info["step"][0] >= 1:
            os.kill(info["pid"], signal.SIGKILL)
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert len(lines) == 1 and lines[0].startswith("bench: lost: split-digits small-cnn ewc s0"), err[-3000:]
    assert (
        "ended without finishing its runs" in lines[0]
        and "experiences are checkpointed, re-run the sweep to resume" in lines[0]
    )
    state = store.cell_state(cell.run_dir)
    assert state.state == "failed" and re.match(
        r"interrupted: pid \d+ on .* died \(\d/3 experiences done; re-run to resume\)", state.detail
    ), state

    assert main(["sweep", str(path), "--executor", "debug", "--runs-dir", str(runs), "--quiet"]) == 0  # resume here
    rec = json.loads(cell.record_path.read_text())
    assert rec["resumes"][0]["from_step"] >= 1
    from clcompose.bench.runs.run import run

    _, reference = run(cell.config, runs_dir=tmp_path / "reference", progress=False)
    assert rec["accuracy_matrix"] == reference["accuracy_matrix"] and rec["metrics"] == reference["metrics"]


@pytest.mark.slow
def test_two_sweeps_at_once_write_every_record_exactly_once(tmp_path):
    """Two processes sweep the same cells at the same time (each runs its cells itself: debug executor)."""
    path = write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]"))
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "clcompose.bench",
        "sweep",
        str(path),
        "--executor",
        "debug",
        "--runs-dir",
        str(runs),
        "--quiet",
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert len(records(runs)) == 6
    assert not [p for p in runs.rglob("*") if p.name.endswith(".tmp")]

    def count(pattern: str, out: str) -> int:
        m = re.search(pattern, out)
        return int(m.group(1)) if m else 0

    ran = [count(r"(\d+) run now", out) for out, _ in outs]
    assert sum(ran) == 6, outs  # every cell ran in exactly one of the two sweeps
    for (
        out,
        _,
    ) in outs:  # each sweep accounts for every cell: its own, the other's, done before it looked, or still running
        parts = ("run now", "finished by another process", "already done", "still running in another process")
        assert sum(count(rf"(\d+) {p}", out) for p in parts) == 6, out
    for cell in load_sweep(path, runs_dir=runs).cells:
        rec = json.loads(cell.record_path.read_text())
        assert rec["config_hash"] == cell.hash


def test_busy_and_concurrently_written_cells(tmp_path, monkeypatch):
    """A cell held by another process is not run; a record that appears while running is kept, not clobbered."""
    (cell,) = load_sweep(
        write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0]").replace(", joint: {}", "")),
        runs_dir=tmp_path / "runs",
    ).cells
    lock = store.CellLock(cell.run_dir)
    assert lock.acquire()
    write_json_atomic(cell.run_dir / store.RUNNING, {"host": "elsewhere", "pid": 1, "job_id": "77_1"}, overwrite=True)
    outcome = run_cell(cell.config, cell.hash, cell.run_dir)
    assert outcome["status"] == "busy" and outcome["holder"]["job_id"] == "77_1"
    assert store.cell_state(cell.run_dir).state == "running"  # another host: assumed alive
    lock.release()
    (cell.run_dir / store.RUNNING).unlink()

    import clcompose.bench.sweeps.worker as worker

    real_execute = worker.execute

    def execute_then_someone_else_writes(*args, **kwargs):
        record = real_execute(*args, **kwargs)
        cell.record_path.write_text('{"written": "by the other sweep"}')
        return record

    monkeypatch.setattr(worker, "execute", execute_then_someone_else_writes)
    outcome = run_cell(cell.config, cell.hash, cell.run_dir)
    assert outcome["status"] == "duplicate"
    assert json.loads(cell.record_path.read_text()) == {"written": "by the other sweep"}  # kept
    assert not (cell.run_dir / "checkpoint.pt").exists()


def test_a_changed_config_resolution_is_refused(tmp_path):
    (cell,) = load_sweep(
        write(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0]").replace(", joint: {}", "")),
        runs_dir=tmp_path / "runs",
    ).cells
    outcome = run_cell(cell.config, "0" * 64, cell.run_dir)
    assert outcome["status"] == "failed" and "resolves to another hash than at submission" in outcome["error"]


def test_help_lists_the_new_verbs():
    r = subprocess.run([sys.executable, "-m", "clcompose.bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for verb in ("sweep", "status", "aggregate", "leaderboard", "perf", "main"):
        assert verb in r.stdout
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import clcompose.bench.cli, sys; print(sorted(m for m in ('torch', 'pandas', 'avalanche', 'submitit') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "[]", r.stdout  # heavy libraries stay out of `bench --help`
