"""Side-by-side cost of ITA / IEL / task arithmetic against naive fine-tuning on the main job's stream.

Runs the strategies interleaved in one process (naive, ita, iel, task-arithmetic, naive, ita, …) on the stream,
backbone, epochs and optimiser settings of ``examples/default.yaml`` (each strategy with its own options there),
so that machine noise hits all of them alike. Per experience it reads from the run record: the training wall
time (which includes each strategy's preparation: the θ0 pass, pre-consolidation and the Fisher), the Fisher's
seconds, the θ0 pass's seconds, the evaluation time (less the diagnostics, which run inside the evaluation) and
the diagnostics' seconds (``strategy_extras``, when the strategy records them apart), and the breakdown of the training time: θ0 pass, probe + class statistics +
anchor alignment, Fisher, the rest of the preparation (head Fisher, regulariser set-up), the post-training alignment of the trained heads, the regulariser steps, and the rest
(the training iterations and everything else), each to set against naive's whole training time; and per run the peak resident memory (Linux: VmHWM, reset before each run through
/proc/self/clear_refs) or, on CUDA, the peak allocated memory. A measurement, never a test of speed.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STRATEGIES = ("naive", "ita", "iel", "task-arithmetic")


def main_job(sweep: Path | None = None) -> dict[str, Any]:
    """Benchmark, backbone, train settings and each strategy's options of the main job's sweep file."""
    from clcompose.bench.io import read_yaml_mapping, resource_dir

    data = read_yaml_mapping(sweep or resource_dir("examples") / "default.yaml", "sweep")
    ((benchmark, benchmark_options),) = data["benchmarks"].items()
    ((backbone, backbone_options),) = data["backbones"].items()
    return {
        "benchmark": benchmark,
        "benchmark_options": dict(benchmark_options or {}),
        "backbone": backbone,
        "backbone_options": dict(backbone_options or {}),
        "train": dict(data.get("train") or {}),
        "strategies": {k: dict(v or {}) for k, v in data["strategies"].items()},
    }


def run_config(job: dict[str, Any], strategy: str, seed: int, overrides: dict[str, Any], device: str) -> dict:
    """The run config of ``strategy`` in ``job``: its sweep options (and ``train:`` overrides), then
    ``overrides`` = {"benchmark_options": …, "train": …, "strategy_options": … (task-vector strategies only)}."""
    options = copy.deepcopy(job["strategies"].get(strategy, {}))
    train = dict(job["train"]) | options.pop("train", {}) | overrides.get("train", {})
    if strategy in ("ita", "iel", "task-arithmetic"):
        options |= overrides.get("strategy_options", {})
    return {
        "benchmark": job["benchmark"],
        "backbone": job["backbone"],
        "strategy": strategy,
        "seed": seed,
        "benchmark_options": job["benchmark_options"] | overrides.get("benchmark_options", {}),
        "backbone_options": job["backbone_options"],
        "strategy_options": options,
        "train": train,
        "device": device,
    }


def _reset_peak_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM (the peak resident set)
    except OSError:
        pass


def _peak_memory_mb(device: str) -> float | None:
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def experience_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per training step of a run record: train/eval wall seconds and, where recorded, the θ0 pass's,
    the Fisher's and the diagnostics' seconds (0 when the strategy has none); ``evaluation_s`` is the eval wall
    time less the diagnostics, which the task-vector strategies run inside it."""
    extras = record.get("strategy_extras") or {}
    prep = {p["experience"]: p for p in extras.get("preparation") or []}
    diagnostics = {d["tasks"]: d["seconds"] for d in extras.get("diagnostics_seconds") or []}  # per task count
    rows = []
    for i, step in enumerate(record["timing"]["steps"]):
        p = prep.get(step["step"], {})
        theta0 = p.get("theta0_s", 0.0)
        row = {
            "experience": step["step"],
            "train_wall_s": step["train_wall_s"],
            "eval_wall_s": step.get("eval_wall_s", 0.0),
            "theta0_s": theta0,
            "fisher_s": p.get("fisher_s", 0.0),
            "prepare_s": p.get("prepare_s", 0.0),
            # the record's consolidation_s counts from the start of the preparation, θ0 pass included
            "consolidation_s": max(0.0, p.get("consolidation_s", theta0) - theta0),
            "align_trained_s": p.get("align_trained_s", 0.0),
            "regularizer_step_s": p.get("regularizer_step_s", 0.0),
            "diagnostics_s": float(diagnostics.get(i + 1, 0.0)),
        }
        # the diagnostics run inside the evaluation (after its last batch): the evaluation proper is the rest
        row["evaluation_s"] = round(max(0.0, row["eval_wall_s"] - row["diagnostics_s"]), 4)
        timed = p.get("consolidation_s", theta0) + row["fisher_s"]  # θ0 pass, consolidation and Fisher
        row["other_preparation_s"] = round(max(0.0, row["prepare_s"] - timed), 4)  # head Fisher, regulariser set-up
        apart = row["prepare_s"] + row["align_trained_s"] + row["regularizer_step_s"]
        row["rest_s"] = round(row["train_wall_s"] - apart, 4)  # training iterations, data loading, the rest
        rows.append(row)
    return rows


BREAKDOWN = (
    "theta0_s",
    "consolidation_s",
    "fisher_s",
    "other_preparation_s",
    "align_trained_s",
    "regularizer_step_s",
    "rest_s",
)


# the untimed warm-up run of each strategy: the main job's stream at ≤ 10 training and test examples per class, 1 epoch
WARMUP = {"benchmark_options": {"per_class": 10, "test_per_class": 10}, "train": {"epochs": 1}}


def measure(
    strategies: list[str] | tuple[str, ...] = STRATEGIES,
    repeats: int = 1,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    sweep: Path | None = None,
    progress: bool = True,
    warmup: bool = True,
) -> dict[str, Any]:
    """Run ``strategies`` interleaved ``repeats`` times on the main job (with ``overrides``) and summarise each
    strategy relative to the first (naive). With ``warmup``, each strategy first runs once, untimed, for one epoch
    on at most 10 examples per class (:data:`WARMUP`): the first timed run of a process otherwise also pays its
    one-time costs (reading the data, lazy imports, the allocator's first growth, first calls of each kernel)."""
    from clcompose.bench.runs.config import RunConfig
    from clcompose.bench.runs.run import execute

    job, overrides = main_job(sweep), overrides or {}
    if warmup:
        stream = job["benchmark_options"] | overrides.get("benchmark_options", {})
        small = {k: min(v, int(stream.get(k) or v)) for k, v in WARMUP["benchmark_options"].items()}
        small = overrides | {
            "benchmark_options": overrides.get("benchmark_options", {}) | small,
            "train": overrides.get("train", {}) | WARMUP["train"],
        }
        for name in strategies:
            execute(RunConfig.from_dict(run_config(job, name, 0, small, device)).resolve(), progress=False)
        if progress:
            print(f"  warmed up: {', '.join(strategies)}", file=sys.stderr)
    rows: dict[str, list[dict]] = {s: [] for s in strategies}
    runs: dict[str, list[dict]] = {s: [] for s in strategies}
    for r in range(repeats):
        for name in strategies:
            cfg = RunConfig.from_dict(run_config(job, name, r, overrides, device))
            _reset_peak_memory(device)
            t = time.perf_counter()
            rec = execute(cfg.resolve(), progress=False)
            wall = time.perf_counter() - t
            runs[name].append(
                {
                    "repeat": r,
                    "wall_s": round(wall, 3),
                    "peak_memory_mb": _peak_memory_mb(device),
                    "final_average_accuracy": rec["metrics"]["final_average_accuracy"],
                }
            )
            rows[name] += [{"repeat": r, **row} for row in experience_rows(rec)]
            if progress:
                print(f"  {name} repeat {r}: {wall:.1f} s", file=sys.stderr)
    base = statistics.mean(x["train_wall_s"] for x in rows[strategies[0]])
    summary = {}
    for name, xs in rows.items():
        keys = ("train_wall_s", "eval_wall_s", "evaluation_s", "theta0_s", "fisher_s")
        mean = {k: statistics.mean(x[k] for x in xs) for k in keys}
        diagnostics = statistics.mean(x["diagnostics_s"] for x in xs)
        summary[name] = {
            "train_wall_per_experience_s": round(mean["train_wall_s"], 3),
            "relative_to_" + strategies[0]: round(mean["train_wall_s"] / base, 3),
            "theta0_per_experience_s": round(mean["theta0_s"], 3),
            "fisher_per_experience_s": round(mean["fisher_s"], 3),
            "fisher_share": round(mean["fisher_s"] / mean["train_wall_s"], 3),
            "eval_wall_per_experience_s": round(mean["eval_wall_s"], 3),  # diagnostics included
            "evaluation_per_experience_s": round(mean["evaluation_s"], 3),  # diagnostics excluded
            "diagnostics_per_experience_s": round(diagnostics, 3),
            "breakdown_per_experience_s": {k: round(statistics.mean(x[k] for x in xs), 3) for k in BREAKDOWN},
            "peak_memory_mb": max((x["peak_memory_mb"] or 0.0) for x in runs[name]) or None,
            "final_average_accuracy": round(statistics.mean(x["final_average_accuracy"] for x in runs[name]), 4),
        }
    return {
        "benchmark": job["benchmark"],
        "backbone": job["backbone"],
        "benchmark_options": job["benchmark_options"] | overrides.get("benchmark_options", {}),
        "backbone_options": job["backbone_options"],
        "overrides": overrides,
        "device": device,
        "repeats": repeats,
        "warmup": WARMUP if warmup else None,
        "summary": summary,
        "runs": runs,
        "rows": rows,
    }
