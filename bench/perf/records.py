"""``bench perf``: how fast the result store aggregates, and how fast the command line answers.

Writes N synthetic but complete records (the real schema, random accuracy matrices, grids and seeds over a
few benchmarks), then times ``load_results`` + ``write_tables`` in this process and a whole ``bench aggregate``
process, and the latency of ``bench --help``. Prints figures; it is a measurement, not a test.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = ("split-fmnist", "split-cifar100", "split-digits")
STRATEGIES = ("naive", "ewc", "lwf", "joint", "ita", "iel", "task-arithmetic")


def synthetic_record(i: int, rng, n_experiences: int = 5) -> dict[str, Any]:
    """A complete record as `bench run` writes it, with random but plausible numbers."""
    from clcompose.bench.runs.config import config_hash
    from clcompose.bench.runs.record import SCHEMA_VERSION
    from clcompose.strategies.metrics import continual as M

    benchmark = BENCHMARKS[i % len(BENCHMARKS)]
    strategy = STRATEGIES[(i // len(BENCHMARKS)) % len(STRATEGIES)]
    group = i // (len(BENCHMARKS) * len(STRATEGIES))
    seed, grid = group % 5, group // 5  # 5 seeds per variant, as many grid values as needed
    config = {
        "benchmark": benchmark,
        "backbone": "efficientnet-lite0",
        "strategy": strategy,
        "seed": seed,
        "stream_seed": seed,
        "benchmark_options": {
            "n_experiences": n_experiences,
            "per_class": 100,
            "test_per_class": 100,
            "data_root": None,
            "download": False,
        },
        "backbone_options": {"image_size": 32, "pretrained": True, "drop_connect_rate": 0.0},
        "strategy_options": {"strength": float(10 ** (grid % 7)), "variant": grid},
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "eval_batch_size": 256,
            "optimizer": "adam",
            "lr": 0.0005,
            "momentum": 0.9,
            "weight_decay": 0.0,
        },
        "device": "cpu",
        "threads": 1,
    }
    steps = 1 if strategy == "joint" else n_experiences
    matrix = []
    for r in range(steps):
        seen = n_experiences if strategy == "joint" else r + 1
        matrix.append([round(float(rng.uniform(0.3, 1.0)), 4) if c < seen else 0.0 for c in range(n_experiences)])
    metrics = (
        M.summarize(matrix)
        if steps == n_experiences
        else {
            "final_average_accuracy": sum(matrix[0]) / n_experiences,
            "forgetting": None,
            "bwt": None,
            "accuracy_curve": None,
        }
    )
    digest = config_hash(config)
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": f"{benchmark}_efficientnet-lite0_{strategy}_s{seed}_{digest[:10]}",
        "status": "complete",
        "created": "2025-01-01T00:00:00+00:00",
        "config": config,
        "config_hash": digest,
        "seeds": {"seed": seed, "stream_seed": seed},
        "stream": {
            "dataset": benchmark,
            "class_order": list(range(10)),
            "class_names": [f"c{k}" for k in range(10)],
            "train_size": 1000,
            "test_size": 1000,
            "image_shape": [1, 28, 28],
            "data_digest": "0" * 16,
            "n_experiences": n_experiences,
        },
        "accuracy_matrix": matrix,
        "metrics": metrics,
        "timing": {
            "setup_wall_s": 2.5,
            "steps": [
                {"step": k, "experiences": [k], "train_wall_s": 5.0, "train_cpu_s": 5.0, "eval_wall_s": 0.5}
                for k in range(steps)
            ],
            "total_wall_s": float(rng.uniform(20, 60)),
            "total_cpu_s": 30.0,
        },
        "peak_memory_mb": 900.0,
        "peak_cuda_memory_mb": None,
        "environment": {
            "host": "synthetic",
            "platform": "Linux",
            "python": "3.11.7",
            "packages": {"torch": "2.13.0", "avalanche-lib": "0.6.0"},
            "git": {"commit": "0" * 40, "dirty": False},
            "torch_threads": 1,
            "cuda": None,
            "cpu_count": 2,
            "job_id": None,
        },
    }
    if strategy in ("ita", "iel"):
        record["strategy_extras"] = {
            "diagnostics": [
                {
                    "tasks": k + 1,
                    "examples": 100,
                    "jensen_gap": float(rng.uniform(0, 1)),
                    "fisher_spread": None if k == 0 else float(rng.uniform(0, 2)),
                    "tau_norm": [float(rng.uniform(1, 5)) for _ in range(k + 1)],
                    "cosine": [[1.0] * (k + 1)] * (k + 1),
                }
                for k in range(steps)
            ]
        }
    return record


def write_synthetic(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` records as ``folder/<run id>/record.json`` (as a sweep lays them out)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for i in range(n):
        rec = synthetic_record(i, rng)
        path = Path(folder) / rec["run_id"] / "record.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=2))
    return Path(folder)


def _bench_command() -> list[str]:
    script = Path(sys.executable).with_name("bench")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clcompose.bench"]


def time_help(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(_bench_command() + ["--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return times


def main(records: int = 10_000, help_runs: int = 5, keep: str | None = None) -> int:
    from clcompose.bench.report.aggregate import load_results, write_tables

    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-perf-"))
    try:
        t = time.perf_counter()
        write_synthetic(tmp / "runs", records)
        print(f"wrote {records} synthetic records in {time.perf_counter() - t:.1f} s ({tmp / 'runs'})")
        t = time.perf_counter()
        results = load_results([tmp / "runs"])
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        written = write_tables(results, tmp / "out")
        t_tables = time.perf_counter() - t
        print(
            f"aggregate in process: read {len(results.runs)} records in {t_load:.2f} s, "
            f"{len(written)} tables in {t_tables:.2f} s: {t_load + t_tables:.2f} s in all (target <= 5 s)"
        )
        t = time.perf_counter()
        subprocess.run(
            _bench_command() + ["aggregate", str(tmp / "runs"), "--out", str(tmp / "out2")],
            capture_output=True,
            check=True,
        )
        print(
            f"`bench aggregate` of {records} records as a command (start-up and imports included): {time.perf_counter() - t:.2f} s"
        )
        if help_runs:
            times = time_help(help_runs)
            print(
                f"`bench --help`: median {statistics.median(times):.3f} s, max {max(times):.3f} s over {help_runs} runs (target <= 1 s)"
            )
        print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0
