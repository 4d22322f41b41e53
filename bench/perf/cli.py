"""Latency of ``bench list`` and of every ``bench … --help``, warm and cold.

Cold: an empty ``$BENCH_CACHE`` and an empty bytecode cache (``PYTHONPYCACHEPREFIX`` pointing at a fresh
folder), so every module the command imports is compiled afresh, as after a change to any source file (which is
when ``bench list`` used to take seconds: it described the registries by importing them). Warm: the same
command again with the caches it left. Each latency is a whole process, start-up included.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VERBS = ("run", "list", "skills", "sweep", "status", "aggregate", "leaderboard", "perf", "main")


def bench_command() -> list[str]:
    script = Path(sys.executable).with_name("bench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clcompose.bench"]


def _timed(args: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(bench_command() + args, capture_output=True, check=True, env=env)
    return time.perf_counter() - t


def measure(runs: int = 3, commands: list[list[str]] | None = None) -> dict:
    """{"rows": [{command, cold_s, warm_s}], "max_cold_s", "max_warm_s"}: medians over ``runs`` of each command
    (default: ``list``, ``--help`` and ``VERB --help`` of every verb), cold with fresh caches each time."""
    commands = commands or [["list"], ["--help"]] + [[v, "--help"] for v in VERBS]
    rows = []
    for args in commands:
        cold, warm = [], []
        for _ in range(runs):
            with tempfile.TemporaryDirectory(prefix="bench-perf-cli-") as tmp:
                env = os.environ | {
                    "BENCH_CACHE": str(Path(tmp) / "cache"),
                    "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pyc"),
                }
                cold.append(_timed(args, env))
                warm.append(_timed(args, env))
        rows.append(
            {
                "command": "bench " + " ".join(args),
                "cold_s": round(statistics.median(cold), 3),
                "warm_s": round(statistics.median(warm), 3),
            }
        )
    return {
        "runs": runs,
        "rows": rows,
        "max_cold_s": max(r["cold_s"] for r in rows),
        "max_warm_s": max(r["warm_s"] for r in rows),
    }
