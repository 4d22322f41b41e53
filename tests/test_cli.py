"""The command line: bad input gives one clear line and exit code 2, and never touches existing results."""

import subprocess
import sys

import pytest

from clcompose.bench.cli.main import main


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clcompose.bench", *args], capture_output=True, text=True, timeout=600)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), r.stderr[-3000:]
    return lines[0]


QUICK = [
    "run",
    "--benchmark",
    "split-digits",
    "--backbone",
    "small-cnn",
    "--set",
    "backbone.source=digits",
    "--set",
    "backbone.pretrain_epochs=1",
    "--set",
    "backbone.input_size=16",
    "--quiet",
]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--strategy", "nope"], r"unknown strategy 'nope'; valid: .*ewc.*naive"),
        (
            ["--strategy", "naive", "--benchmark", "split-nothing"],
            r"unknown benchmark 'split-nothing'; valid: .*split-fmnist",
        ),
        (["--strategy", "naive", "--backbone", "alexnet"], r"unknown backbone 'alexnet'; valid: .*efficientnet-lite0"),
        (["--strategy", "ewc", "--set", "strategy.ewc_lambda=-3"], r"ewc_lambda must be >= 0"),
        (["--strategy", "ewc", "--set", "strategy.ewc_lambda=lots"], r"ewc_lambda must be a number"),
        (["--strategy", "naive", "--epochs", "0"], r"epochs must be >= 1"),
        (["--strategy", "naive", "--set", "train.optimizer=rmsprop"], r"optimizer must be one of sgd, adam, adamw"),
        (["--strategy", "naive", "--set", "strategy.lambda=1"], r"unknown option\(s\) lambda for strategy 'naive'"),
        (["--strategy", "naive", "--set", "nonsense"], r"--set expects SECTION.KEY=VALUE"),
        (
            ["--strategy", "naive", "--n-experiences", "11"],
            r"n_experiences must be between 1 and the number of classes",
        ),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_clear_line(args, pattern, tmp_path):
    r = bench(*QUICK, "--runs-dir", str(tmp_path), *args)
    assert __import__("re").search(pattern, one_error_line(r))
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_existing_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "record.json"
    out.write_text('{"keep": true}')
    line = one_error_line(bench(*QUICK, "--strategy", "naive", "--out", str(out)))
    assert "already exists" in line and out.read_text() == '{"keep": true}'


def test_missing_data_names_the_fix(tmp_path, monkeypatch, capsys):
    import clcompose.bench.data.datasets as D

    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN", tmp_path / "absent")
    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)
    code = main(
        [
            "run",
            "--benchmark",
            "split-fmnist",
            "--strategy",
            "naive",
            "--data-root",
            str(tmp_path),
            "--quiet",
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]


@pytest.mark.slow
def test_malformed_config_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("strategy: [naive\n")
    assert "not valid YAML" in one_error_line(bench("run", "--config", str(cfg)))
    cfg.write_text("- just\n- a list\n")
    assert "must hold a mapping" in one_error_line(bench("run", "--config", str(cfg)))
    cfg.write_text("strategy: naive\nsede: 3\n")
    assert "unknown run config key(s) sede" in one_error_line(bench("run", "--config", str(cfg)))


@pytest.mark.slow
def test_config_file_run_and_list(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "benchmark: split-digits\nbackbone: small-cnn\nstrategy: naive\nseed: 2\n"
        "backbone_options: {source: digits, pretrain_epochs: 1, input_size: 16}\n"
        "benchmark_options: {n_experiences: 2, per_class: 10}\n"
    )
    r = bench("run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final average accuracy" in r.stdout and len(list((tmp_path / "runs").glob("*/record.json"))) == 1
    r = bench("list")
    assert r.returncode == 0 and "split-fmnist" in r.stdout and "efficientnet-lite0" in r.stdout and "ewc" in r.stdout


def test_help_lists_the_verbs():
    r = subprocess.run([sys.executable, "-m", "clcompose.bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "run" in r.stdout and "list" in r.stdout
