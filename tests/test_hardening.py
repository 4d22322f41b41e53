"""Bad input and faults (issue 16): every bad input is one ``bench: error:`` line and exit code 2, found when the
config is resolved (so a dry-run reports it); unusable places are one line too; and the CLI papercuts.

The store's faults (damaged records, records that cannot be written, leftovers, locks) are in
``test_hardening_store.py``; the loggers in ``test_loggers.py``.
"""

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clcompose.bench.cli.main import main, parse_assignments
from clcompose.bench.runs.config import RunConfig
from clcompose.bench.sweeps.sweep import load_sweep
from clcompose.strategies.core.registry import ConfigError, _coerce

REPO = Path(__file__).resolve().parent.parent

TINY = """
name: tiny
seeds: [0]
benchmarks: {split-digits: {n_experiences: 3, per_class: 20}}
backbones: {small-cnn: {source: digits, pretrain_epochs: 1, input_size: 16, width: 8}}
strategies: {naive: {}, ewc: {}}
train: {epochs: 1, batch_size: 16, lr: 0.01}
"""
RUN = ["run", "--benchmark", "split-digits", "--backbone", "small-cnn", "--strategy", "naive", "--quiet"]
RUN += ["--set", "backbone.source=digits", "--set", "backbone.pretrain_epochs=1", "--set", "backbone.input_size=16"]
RUN += ["--n-experiences", "2", "--per-class", "10", "--epochs", "1"]
NON_FINITE_TEXT = ["inf", "-inf", "+inf", "nan", "NaN", "Infinity", "1e400", "-1e400", "1e999"]
NON_FINITE_YAML = [".inf", "-.inf", "+.inf", ".nan", ".NaN", "1.0e+400", "-1.0e+400"]


def bench(*args: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clcompose.bench", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), r.stderr[-3000:]
    return lines[0]


def in_process(capsys, *args: str) -> tuple[int, str, list[str]]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def error_of(capsys, *args: str) -> str:
    code, _, err = in_process(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("bench: error: "), (code, err)
    return err[0]


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def small_config(**extra) -> dict:
    cfg = {
        "benchmark": "split-digits",
        "backbone": "small-cnn",
        "strategy": "naive",
        "benchmark_options": {"n_experiences": 2, "per_class": 10},
        "backbone_options": {"source": "digits", "pretrain_epochs": 1, "input_size": 16, "width": 8},
        "train": {"epochs": 1, "batch_size": 16},
    }
    for key, value in extra.items():
        cfg[key] = cfg.get(key, {}) | value if isinstance(value, dict) else value
    return cfg


# --------------------------------------------------------------------------- non-finite and out-of-range numbers


@pytest.mark.parametrize("value", NON_FINITE_TEXT)
def test_non_finite_numbers_are_refused_wherever_an_option_is_a_number(value):
    for cfg in (
        small_config(train={"lr": value}),
        small_config(strategy="ewc", strategy_options={"ewc_lambda": value}),
        small_config(strategy="ita", strategy_options={"alpha": value}),
        small_config(strategy="task-arithmetic", strategy_options={"lambda_grid": [0.5, value]}),  # a list's item
        small_config(backbone_options={"pretrain_lr": value}),
    ):
        with pytest.raises(ConfigError, match=r"must be a finite number, got "):
            RunConfig.from_dict(cfg).resolve()
    with pytest.raises(ConfigError, match="must be an integer"):  # an int option given a non-finite number
        RunConfig.from_dict(small_config(train={"epochs": value})).resolve()


@pytest.mark.parametrize("value", NON_FINITE_YAML)
def test_non_finite_numbers_in_a_sweep_file_fail_the_dry_run(value, tmp_path, capsys):
    for text in (
        TINY.replace("lr: 0.01", f"lr: {value}"),
        TINY.replace("ewc: {}", f"ewc: {{ewc_lambda: {value}}}"),
        TINY.replace("ewc: {}", f"ewc: {{ewc_lambda: {{grid: [1, {value}]}}}}"),
        TINY.replace("ewc: {}", f"task-arithmetic: {{lambda_grid: [0.5, {value}]}}"),
    ):
        path = write(tmp_path, text)
        line = error_of(capsys, "sweep", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
        assert "must be a finite number" in line, line
    assert not (tmp_path / "runs").exists()


def test_numbers_beyond_the_float_range_are_one_line():
    with pytest.raises(ConfigError, match="must be a finite number, got an integer of 1329 bits"):
        _coerce(10**400, float, "x")
    with pytest.raises(ConfigError, match="must be an integer of reasonable size, got 5000 digits"):
        _coerce("7" * 5000, int, "x")  # beyond Python's limit on int() of a string
    for bad in ("-+5", "²", "0x10"):
        with pytest.raises(ConfigError, match="must be an integer"):
            _coerce(bad, int, "x")
    assert _coerce(10**400, int, "x") == 10**400  # exact, no float on the way
    assert _coerce("12", int, "x") == 12 and _coerce(3.0, int, "x") == 3 and _coerce("1e3", int, "x") == 1000
    assert _coerce("1e-3", float, "x") == 0.001 and math.isfinite(_coerce("1.7e308", float, "x"))
    for bad in ("1e400", float("inf"), "nan", "1.5"):
        with pytest.raises(ConfigError, match="must be an integer"):
            _coerce(bad, int, "x")


@pytest.mark.parametrize("key", ["seed", "stream_seed"])
def test_seeds_must_fit_numpy(key, capsys):
    RunConfig.from_dict({key: 2**32 - 1})  # the largest NumPy seed
    for bad in (2**32, 2**64, 10**30):
        with pytest.raises(ConfigError, match=rf"{key} must be below 2\*\*32 = 4294967296"):
            RunConfig.from_dict({key: bad})
    flag = "--seed" if key == "seed" else "--stream-seed"
    assert "must be below 2**32" in error_of(capsys, *RUN, flag, str(2**32), "--runs-dir", "/nonexistent/runs")


def test_a_device_is_checked_at_resolve_time(capsys, tmp_path):
    for good in ("cpu", "cuda", "cuda:3", "mps"):
        RunConfig.from_dict({"device": good})
    for bad in ("banana", "CPU", "cuda:", "cuda:x", "", "gpu", 3):
        with pytest.raises(ConfigError, match="device must be cpu, cuda, cuda:N, mps or xpu"):
            RunConfig.from_dict({"device": bad})
    assert "got 'banana'" in error_of(capsys, *RUN, "--device", "banana", "--runs-dir", str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--seed", "many"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("bench: error: bench run: argument --seed")
    with pytest.raises(SystemExit):
        main(["aggregate", "runs"])  # --out is required
    assert "the following arguments are required: --out" in capsys.readouterr().err


# --------------------------------------------------------------------------- limits that depend on the data


@pytest.mark.parametrize(
    "benchmark, options, pattern",
    [
        ("split-digits", {"n_experiences": 11}, r"number of classes \(10\), got 11"),
        ("split-digits", {"n_experiences": 0}, r"n_experiences must be >= 1"),
        ("split-mnist5k-animal", {"n_experiences": 21}, r"number of classes \(20\), got 21"),
        ("split-cifar10", {"n_experiences": 11}, r"number of classes \(10\), got 11"),
        ("split-cifar100", {"n_experiences": 101}, r"number of classes \(100\), got 101"),
        ("teacher-random", {"n_experiences": 1000}, r"cannot split \d+ combinations into 1000 experiences"),
    ],
)
def test_stream_limits_are_checked_when_resolving(benchmark, options, pattern, tmp_path, capsys):
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.from_dict({"benchmark": benchmark, "benchmark_options": options}).resolve()
    path = write(tmp_path, TINY.replace("split-digits: {n_experiences: 3, per_class: 20}", f"{benchmark}: {options}"))
    line = error_of(capsys, "sweep", str(path), "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert re.search(pattern, line), line


def test_the_class_counts_known_without_loading_match_the_data():
    from clcompose.bench.data.datasets import NUM_CLASSES, load_dataset
    from tests.conftest import require_data

    assert load_dataset("digits").num_classes == NUM_CLASSES["digits"]
    for name in ("mnist5k", "animal"):
        assert require_data(name).num_classes == NUM_CLASSES[name]
    RunConfig.from_dict({"benchmark": "split-mnist5k-animal", "benchmark_options": {"n_experiences": 20}}).resolve()


# --------------------------------------------------------------------------- YAML: duplicated keys, --set values


def test_a_duplicated_key_is_an_error_in_every_yaml_file(tmp_path, capsys):
    cfg = write(tmp_path, "strategy: naive\nseed: 1\nstrategy: ewc\n", "run.yaml")
    line = error_of(capsys, "run", "--config", str(cfg))
    assert "run.yaml is not valid YAML at line 3: duplicate key 'strategy' (first at line 1)" in line
    write(tmp_path, "executor: local\nworkers: 1\nworkers: 4\n", "p.yaml")
    sweep = write(tmp_path, TINY + "cluster: ./p.yaml\n")
    assert "duplicate key 'workers'" in error_of(capsys, "sweep", str(sweep), "--dry-run")
    nested = write(tmp_path, TINY.replace("epochs: 1,", "epochs: 1, epochs: 2,"))
    assert "duplicate key 'epochs'" in error_of(capsys, "status", str(nested))
    from clcompose.bench.io import load_yaml

    assert load_yaml("a: &x {k: 1, j: 2}\nb: {<<: *x, k: 3}\n")["b"] == {"k": 3, "j": 2}  # merge keys still work


def test_set_values_that_look_like_lists_or_mappings_are_yaml(capsys):
    parsed = parse_assignments(
        ["strategy.lambda_grid=[0.5,1]", "train.lr={grid: [0.1, 0.2]}", "train.optimizer=adam", "benchmark.x=on"]
    )
    assert parsed["strategy_options"] == {"lambda_grid": [0.5, 1]}
    assert parsed["train"] == {"lr": {"grid": [0.1, 0.2]}, "optimizer": "adam"}
    assert parsed["benchmark_options"] == {"x": "on"}  # scalars stay strings: each option converts its own
    options = parse_assignments(["strategy.lambda_grid=[0.5,1]"])["strategy_options"]
    resolved = RunConfig.from_dict({"strategy": "task-arithmetic", "strategy_options": options}).resolve()
    assert resolved.strategy.lambda_grid == [0.5, 1.0]
    for bad, pattern in (
        ("strategy.lambda_grid=[0.5,1", r"is not valid YAML"),
        ("train.lr={a: 1, a: 2}", r"duplicate key 'a'"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            parse_assignments([bad])


def test_sweep_set_applies_to_every_cell(tmp_path, capsys):
    path = write(tmp_path, TINY)
    plain = load_sweep(path, runs_dir=tmp_path)
    sets = parse_assignments(["train.epochs=2", "strategy.ewc_lambda=7", "backbone.width=4"])
    cells = load_sweep(path, runs_dir=tmp_path, overrides=sets).cells
    assert [c.config["train"]["epochs"] for c in cells] == ["2", "2"]  # as given; each option converts it
    assert {c.config["strategy"]: c.config["strategy_options"] for c in cells} == {
        "naive": {},
        "ewc": {"ewc_lambda": "7"},
    }
    assert all(c.config["backbone_options"]["width"] == "4" for c in cells)
    assert not {c.hash for c in cells} & {c.hash for c in plain.cells}
    grid = load_sweep(path, runs_dir=tmp_path, overrides=parse_assignments(["train.lr={grid: [0.1, 0.2]}"])).cells
    assert len(grid) == 4 and {c.config["train"]["lr"] for c in grid} == {0.1, 0.2}
    over = TINY.replace("ewc: {}", "ewc: {train: {epochs: 5}}")  # --set wins over a strategy's own train
    assert all(c.config["train"]["epochs"] == "2" for c in load_sweep(write(tmp_path, over), overrides=sets).cells)
    two_epochs = load_sweep(path, runs_dir=tmp_path, overrides=parse_assignments(["train.epochs=2"])).cells
    code, out, err = in_process(
        capsys, "sweep", str(path), "--dry-run", "--runs-dir", str(tmp_path / "r"), "--set", "train.epochs=2"
    )
    assert code == 0 and all(c.run_id in out for c in two_epochs) and plain.cells[0].run_id not in out
    code, out, _ = in_process(capsys, "status", str(path), "--runs-dir", str(tmp_path / "r"), "--set", "train.epochs=2")
    assert code == 0 and all(c.run_id in out for c in two_epochs)
    line = error_of(capsys, "sweep", str(path), "--dry-run", "--set", "strategy.alpha=1")
    assert "--set strategy.alpha: no strategy of the sweep (naive, ewc) has an option 'alpha'" in line


# --------------------------------------------------------------------------- paths: files, folders, escapes


def test_a_file_where_a_folder_goes_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    sweep = write(tmp_path, TINY)
    for args, pattern in (
        (("sweep", str(sweep), "--dry-run", "--runs-dir", str(blocker)), r"--runs-dir .*blocker is an existing file"),
        (("sweep", str(sweep), "--dry-run", "--runs-dir", str(blocker / "x")), r"blocker is a file, not a folder"),
        (("status", str(write(tmp_path, TINY + f"output: {blocker}\n", "o.yaml"))), r"output .*is an existing file"),
        ((*RUN, "--runs-dir", str(blocker)), r"runs folder .*blocker is an existing file"),
        ((*RUN, "--out", str(blocker / "record.json")), r"blocker is an existing file, not a folder"),
        ((*RUN, "--out", str(blocker / "deeper" / "r.json")), r"blocker is a file, not a folder"),
        (("aggregate", str(tmp_path), "--out", str(blocker)), r"output folder .*blocker is an existing file"),
        (("leaderboard", str(tmp_path), "--out", str(blocker / "x")), r"blocker is a file, not a folder"),
    ):
        line = error_of(capsys, *args)
        assert re.search(pattern, line), (args, line)
    assert blocker.read_text() == "not a folder"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder nothing can be written in, even as root (chattr +i); skips where that is impossible."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    r = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here: {r.stderr.decode().strip()}")
    return folder


@pytest.fixture()
def read_only(tmp_path):
    folder = _read_only_folder(tmp_path)
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_unwritable_places_are_one_line(read_only, tmp_path, capsys):
    sweep = write(tmp_path, TINY)
    for runs in (read_only, read_only / "deeper", Path("/proc/no-such-dir/runs"), Path("/sys/bench-runs")):
        line = error_of(capsys, "sweep", str(sweep), "--executor", "debug", "--runs-dir", str(runs), "--quiet")
        assert re.search(r"runs folder .* is not writable: (Operation not permitted|Permission denied|No such)", line)
        line = error_of(capsys, *RUN, "--runs-dir", str(runs))
        assert line.startswith("bench: error: ") and ("not permitted" in line or "denied" in line or "No such" in line)
    assert not any(read_only.iterdir())


def test_out_may_name_a_folder(tmp_path, capsys):
    code, out, _ = in_process(capsys, *RUN, "--out", f"{tmp_path / 'newdir'}/")
    assert code == 0 and (tmp_path / "newdir" / "record.json").is_file() and not (tmp_path / "newdir.json").exists()
    (tmp_path / "existing").mkdir()
    code, out, _ = in_process(capsys, *RUN, "--out", str(tmp_path / "existing"))  # an existing folder, no slash
    assert code == 0 and (tmp_path / "existing" / "record.json").is_file()
    assert "already exists" in error_of(capsys, *RUN, "--out", f"{tmp_path / 'newdir'}/")


# --------------------------------------------------------------------------- the command line


def test_dry_run_warns_that_the_gpu_templates_account_is_null(capsys):
    code, out, err = in_process(capsys, "sweep", str(REPO / "examples" / "full-protocol.yaml"), "--dry-run")
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("bench: warning: the template profile cluster-gpu sets no account (account: null)")
    code, _, err = in_process(capsys, "sweep", str(REPO / "examples" / "sweep-digits.yaml"), "--dry-run")
    assert code == 0 and not err
    code, _, err = in_process(
        capsys, "sweep", str(REPO / "examples" / "sweep-digits.yaml"), "--dry-run", "--profile", "ci"
    )
    assert code == 0 and not err  # the one-node CI cluster needs no account


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`bench status | head`: the reader goes away before bench writes; no BrokenPipe traceback."""
    path = write(tmp_path, TINY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clcompose.bench", "status", str(path), "--runs-dir", str(tmp_path / "r")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `head` that has read its lines and exited
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert proc.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
    r = subprocess.run(
        f"{sys.executable} -m clcompose.bench status {path} --runs-dir {tmp_path / 'r'} | head -2",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert len(r.stdout.splitlines()) == 2 and "Traceback" not in r.stderr, r.stderr


def test_quiet_also_silences_the_backbone_pretraining(tmp_path):
    env = os.environ | {"BENCH_CACHE": str(tmp_path / "cache")}  # nothing cached: the small CNN is pre-trained
    r = bench(*RUN, "--runs-dir", str(tmp_path / "runs"), "--set", "backbone.width=6", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pre-training" not in r.stderr and "it/s" not in r.stderr, r.stderr[-2000:]
    assert list((tmp_path / "cache").rglob("small-cnn-*.pt"))


def test_list_shows_types_and_defaults_and_is_fast(tmp_path):
    env = os.environ | {"BENCH_CACHE": str(tmp_path / "cache")}
    first = bench("list", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    text = first.stdout
    for expected in (
        "split-fmnist",
        "n_experiences: int = 5",
        "per_class: int | None = null",
        'optimizer: sgd|adam|adamw = "sgd"',
        "lr: float = 0.01",
        "loggers: list[tensorboard|csv|wandb|text] = []",
        "ewc_lambda: float = ",
        "hidden: list[int] = [64, 64]",
    ):
        assert expected in text, expected
    times = []
    for _ in range(3):
        t = time.perf_counter()
        again = bench("list", env=env)
        times.append(time.perf_counter() - t)
        assert again.stdout == text
    assert min(times) < 1.0, times  # the description is cached (keyed by the source), nothing heavy is imported
    verbs = ("run", "list", "skills", "sweep", "status", "aggregate", "leaderboard", "perf", "main")
    for args in [("--help",)] + [(v, "--help") for v in verbs]:
        t = time.perf_counter()
        r = bench(*args)
        assert r.returncode == 0 and time.perf_counter() - t < 1.0, (args, r.stderr[-500:])
