"""The installed package, not the checkout: build a wheel, install it into a fresh venv, use it from elsewhere.

The fresh venv gets only the wheel (pip, --no-deps); its dependencies (torch, avalanche, ...) come from the test environment's
site-packages through a path entry, which Python does not scan for start-up hooks, so the clcompose start-up hook
exercised here is the wheel's own.
"""

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO)],
        cwd=root,
    )
    (wheel,) = dist.glob("clcompose-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=root)
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    )
    (purelib / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bench = venv / "bin" / "bench"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    work = root / "elsewhere"
    work.mkdir()
    return {"wheel": wheel, "python": str(python), "bench": str(bench), "env": env, "work": work, "purelib": purelib}


def test_wheel_ships_the_namespace_the_data_and_the_startup_hook(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "clcompose-torchvision.pth" in names
    assert "clcompose/profiles/local.yaml" in names and "clcompose/examples/sweep-digits.yaml" in names
    assert "clcompose/strategies/task_vectors/ita.py" in names and "clcompose/bench/cli/main.py" in names
    assert not any(n.startswith(("bench/", "strategies/", "tests/")) for n in names)


def test_installed_library_imports_from_elsewhere(installed):
    code = (
        "import clcompose.strategies as s, clcompose.bench.io as io; from clcompose.strategies import ITA; "
        "print(s.__file__); print(io.REPO_ROOT); print(io.resource_dir('profiles'))"
    )
    out = _run([installed["python"], "-c", code], cwd=installed["work"], env=installed["env"]).stdout.split()
    assert out[0].startswith(str(installed["purelib"])) and out[1] == "None"
    assert Path(out[2]) == installed["purelib"] / "clcompose" / "profiles"


def test_avalanche_imported_first_works_with_the_installed_hook(installed):
    _run(
        [installed["python"], "-c", "import avalanche, torchvision; import clcompose.strategies"],
        cwd=installed["work"],
        env=installed["env"],
    )


def test_installed_cli_lists_and_sweeps_with_the_packaged_profile(installed):
    env, work = installed["env"], installed["work"]
    listing = _run([installed["bench"], "list"], cwd=work, env=env).stdout
    assert "ita" in listing and "split-digits" in listing
    sweep = installed["purelib"] / "clcompose" / "examples" / "sweep-digits.yaml"
    text = (
        sweep.read_text()
        .replace("seeds: [0, 1]", "seeds: [0]")
        .replace("ewc_lambda: {grid: [10, 1000]}", "ewc_lambda: 10")
    )
    mine = work / "digits.yaml"
    mine.write_text(text)
    r = _run(
        [installed["bench"], "sweep", str(mine), "--profile", "local", "--runs-dir", str(work / "runs"), "--quiet"],
        cwd=work,
        env=env | {"BENCH_CACHE": str(work / "cache")},
    )
    assert "4 run now" in r.stdout, r.stdout
    records = sorted((work / "runs").glob("*/record.json"))
    assert len(records) == 4
    rec = json.loads(records[0].read_text())
    assert rec["environment"]["git"] == {"commit": None, "dirty": None}  # an installed wheel: its version is recorded
    assert rec["environment"]["packages"]["clcompose"] is not None
