"""``bench list``: the shipped description is the registries' own, and listing or asking for help imports nothing
heavy (checked by the modules loaded, never by a timing)."""

import json
import os
import subprocess
import sys

import pytest

from clcompose.bench.cli import catalog as C

HEAVY = ("torch", "torchvision", "avalanche", "numpy", "pandas", "sklearn", "timm", "yaml")
VERBS = ("run", "list", "skills", "sweep", "status", "aggregate", "leaderboard", "perf", "main")


def test_shipped_description_is_the_registries_own():
    live = C.build_catalog()
    if C.read_packaged() != live:
        C.write_packaged(live)
        pytest.fail(f"{C.PACKAGED} was stale (an option or summary changed); regenerated it: review and commit it")
    assert C.PACKAGED.read_text(encoding="utf-8") == C.dumps(live)  # byte-stable: no diff without a change


def test_list_and_every_help_import_no_heavy_library_on_cold_caches(tmp_path):
    """Cold: an empty $BENCH_CACHE and an empty bytecode cache (every module compiled afresh, as after a change
    to any source file)."""
    code = (
        "import sys\nfrom clcompose.bench.cli.main import main\n"
        f"for argv in [['list']] + [[v, '--help'] for v in {VERBS!r}] + [['--help']]:\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, (argv, e.code)\n"
        "print('LOADED', sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    env = os.environ | {"BENCH_CACHE": str(tmp_path / "cache"), "PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = set(json.loads(r.stdout.split("LOADED ")[-1].replace("'", '"')))
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert "split-fmnist" in r.stdout and "alpha: float = 0.1" in r.stdout
    assert not (tmp_path / "cache").exists()  # nothing is cached: the description ships with the package


def test_a_missing_or_damaged_description_is_rebuilt_live_and_rewritten(tmp_path, capsys):
    path = tmp_path / "catalog.json"
    live = C.build_catalog()
    for content in (None, "{not json", json.dumps({"version": C.CATALOG_VERSION + 1, "sections": {}})):
        if content is not None:
            path.write_text(content)
        assert C.read_packaged(path) is None
        assert C.catalog(path=path) == live
        assert json.loads(path.read_text()) == live and "rewrote" in capsys.readouterr().err
    stale = json.loads(path.read_text())
    stale["sections"]["strategies"] = stale["sections"]["strategies"][:1]
    path.write_text(C.dumps(stale))
    assert C.catalog(path=path) == stale  # without --refresh the shipped file is what is listed
    assert C.catalog(refresh=True, path=path) == live and json.loads(path.read_text()) == live
    assert C.catalog(refresh=True, path=path) == live and capsys.readouterr().err.count("rewrote") == 1


def test_render_names_each_option_with_its_type_and_default():
    data = {
        "version": C.CATALOG_VERSION,
        "sections": {
            "strategies": [
                {"name": "x", "summary": "a strategy", "options": [{"name": "a", "type": "int", "default": "1"}]},
                {"name": "y", "summary": "another", "options": []},
            ],
            "train": [{"name": "train", "summary": "", "options": [{"name": "lr", "type": "float", "default": "0.1"}]}],
        },
    }
    assert C.render(data) == [
        "strategies:",
        f"  {'x':24s} a strategy",
        f"  {'':24s} a: int = 1",
        f"  {'y':24s} another",
        f"  {'':24s} options: -",
        "train:",
        f"  {'':24s} lr: float = 0.1",
    ]
