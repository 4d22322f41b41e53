"""One seeded run: a benchmark stream, a backbone, a strategy → one result record (JSON)."""

from __future__ import annotations

import dataclasses
import random
import re
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clcompose.bench.runs.config import ResolvedRun, RunConfig, config_hash
from clcompose.strategies.core.protocols import ExtraMetrics, FinalMetrics, RecordsExtras, SavesArtifacts, StepMetrics
from clcompose.strategies.core.registry import ConfigError


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_ACC_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/(?:Task\d+/)?Exp(\d+)$")


def accuracy_row(metrics: dict[str, Any], n_experiences: int) -> list[float]:
    """Per-experience test accuracies from Avalanche's ``eval`` result dict."""
    row: dict[int, float] = {}
    for key, value in metrics.items():
        m = _ACC_KEY.match(key)
        if m:
            row[int(m.group(1))] = float(value)
    missing = [i for i in range(n_experiences) if i not in row]
    if missing:
        raise RuntimeError(f"evaluation returned no accuracy for experiences {missing}")
    return [row[i] for i in range(n_experiences)]


def _evaluator():
    import warnings

    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No loggers specified": the record is our log
        return EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])


def execute(
    resolved: ResolvedRun,
    progress: bool = True,
    artifacts_dir: Path | None = None,
    checkpoint_path: Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train the stream and return the record (not yet written).

    Strategies may expose ``record_extras() -> dict`` (stored under ``strategy_extras``),
    ``save_artifacts(folder) -> list[str]`` (e.g. task vectors; called when ``artifacts_dir`` is given) and
    ``final_metrics(benchmark) -> dict`` (scalar metrics computed after the stream, e.g. transfer to a task the
    benchmark held out; merged into the record's ``metrics``; must not change what later steps would see).
    Benchmarks may expose ``extra_metrics(strategy) -> dict`` (scalar metrics of the trained strategy, e.g. on
    probe streams; merged into the record's ``metrics``), ``step_metrics(strategy, trained) -> dict`` (scalars
    after every training step, ``trained`` being the experience indices trained so far, e.g. accuracy on a probe
    stream as training proceeds; the record's ``step_metrics``, computed with the RNG state restored afterwards
    so that they do not change the run) and ``info['input_dim']`` (given to a backbone whose ``in_features``
    option is null).

    With ``checkpoint_path``, the complete training state is saved there after every experience (see
    :mod:`bench.checkpoint`), and a checkpoint already there (of the same config) is resumed: the record of a
    resumed run has the same accuracy matrix and metrics as an uninterrupted one, plus a ``resumes`` entry.
    ``on_step(done, total)`` is called after each training step (e.g. to report progress).
    """
    import torch
    from tqdm.auto import tqdm

    cfg = resolved.config
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r} requested but CUDA is not available here")
    wall0, cpu0 = time.perf_counter(), time.process_time()

    session = _Session.build(resolved)
    loop = _new_loop(resolved, len(session.steps))
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        loop = _resume(Path(checkpoint_path), session, resolved) or loop
    setup_wall = time.perf_counter() - wall0
    earlier_wall, earlier_cpu = loop["wall_s"], loop["cpu_s"]  # spent by earlier attempts up to their checkpoint

    n_steps, n_exp = len(session.steps), session.n_experiences
    bar = tqdm(
        total=n_steps,
        initial=loop["next_step"],
        desc=f"{cfg.strategy} on {cfg.benchmark}",
        unit="exp",
        disable=not progress,
        leave=False,
    )
    for i in range(loop["next_step"], n_steps):
        experiences = session.steps[i]
        t, c = time.perf_counter(), time.process_time()
        session.strategy.train(experiences, eval_streams=[])
        train_wall, train_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        row = accuracy_row(session.strategy.eval(session.test_stream), n_exp)
        loop["matrix"].append(row)
        if isinstance(session.benchmark, StepMetrics):
            with torch.random.fork_rng(devices=[]):
                trained = [e.current_experience for step in session.steps[: i + 1] for e in step]
                loop.setdefault("step_metrics", []).append(
                    {"step": i} | session.benchmark.step_metrics(session.strategy, trained)
                )
        loop["timings"].append(
            {
                "step": i,
                "experiences": [e.current_experience for e in experiences],
                "train_wall_s": round(train_wall, 4),
                "train_cpu_s": round(train_cpu, 4),
                "eval_wall_s": round(time.perf_counter() - t, 4),
            }
        )
        loop["next_step"] = i + 1
        loop["wall_s"] = earlier_wall + time.perf_counter() - wall0
        loop["cpu_s"] = earlier_cpu + time.process_time() - cpu0
        if checkpoint_path is not None:
            checkpoint_path = _save_checkpoint(Path(checkpoint_path), session, loop)
        bar.update()
        bar.set_postfix(acc=f"{sum(row[: i + 1]) / (i + 1):.3f}")
        if on_step is not None:
            on_step(i + 1, n_steps)
    bar.close()
    artifacts = []
    if artifacts_dir is not None and isinstance(session.strategy, SavesArtifacts):
        artifacts = session.strategy.save_artifacts(Path(artifacts_dir))
    timing = {
        "setup_wall_s": round(setup_wall, 4),
        "steps": loop["timings"],
        "total_wall_s": round(earlier_wall + time.perf_counter() - wall0, 4),
        "total_cpu_s": round(earlier_cpu + time.process_time() - cpu0, 4),
    }
    return _record(resolved, session, loop, timing, artifacts)


@dataclasses.dataclass
class _Session:
    """What a run trains: the built benchmark and strategy, and the training steps (one per experience, or one for joint)."""

    benchmark: Any
    strategy: Any
    test_stream: Any
    steps: list[list[Any]]
    n_experiences: int

    @classmethod
    def build(cls, resolved: ResolvedRun) -> _Session:
        from avalanche.training import JointTraining

        from clcompose.bench.data.benchmarks import build_benchmark
        from clcompose.bench.models.backbones import build_backbone
        from clcompose.strategies.core.heads import ClassIncrementalNet
        from clcompose.strategies.core.registry import STRATEGIES

        cfg = resolved.config
        seed_everything(cfg.seed)
        bm = build_benchmark(cfg.benchmark, resolved.benchmark, cfg.stream_seed)
        backbone_options = resolved.backbone
        if getattr(backbone_options, "in_features", 0) is None and "input_dim" in bm.info:
            backbone_options = dataclasses.replace(
                backbone_options, in_features=bm.info["input_dim"]
            )  # a copy: the config stays as given
        backbone = build_backbone(cfg.backbone, backbone_options)
        seed_everything(cfg.seed)  # the same state whether the backbone came from the cache or was just built
        model = ClassIncrementalNet(backbone)
        strategy = STRATEGIES[cfg.strategy].factory(
            model, resolved.strategy, resolved.train, evaluator=_evaluator(), device=cfg.device
        )
        train_stream = list(bm.train_stream)
        steps = [train_stream] if isinstance(strategy, JointTraining) else [[e] for e in train_stream]
        return cls(bm, strategy, bm.test_stream, steps, len(train_stream))


def _new_loop(resolved: ResolvedRun, n_steps: int) -> dict[str, Any]:
    return {
        "config_hash": config_hash(resolved.to_dict()),
        "n_steps": n_steps,
        "next_step": 0,
        "matrix": [],
        "timings": [],
        "wall_s": 0.0,
        "cpu_s": 0.0,
        "resumes": [],
    }


def _resume(path: Path, session: _Session, resolved: ResolvedRun) -> dict[str, Any] | None:
    """Load the checkpoint into ``session``; None (start afresh, with a warning) when it cannot be read."""
    import sys

    from clcompose.bench.io import utc_now
    from clcompose.bench.runs import checkpoint

    try:
        loop = checkpoint.load(path, session.strategy, resolved.config.device)
    except checkpoint.CheckpointError as exc:
        print(f"bench: warning: {exc}; starting the run from the beginning", file=sys.stderr)
        fresh = _Session.build(resolved)  # unpickling may have moved the RNGs: rebuild from the seeds
        session.__dict__.update(fresh.__dict__)
        return None
    if loop.get("config_hash") != config_hash(resolved.to_dict()) or loop.get("n_steps") != len(session.steps):
        raise ConfigError(f"checkpoint {path} belongs to another run config; delete it to start this run afresh")
    loop["resumes"].append({"from_step": loop["next_step"], "at": utc_now(), "host": socket.gethostname()})
    return loop


def _save_checkpoint(path: Path, session: _Session, loop: dict[str, Any]) -> Path | None:
    """Checkpoint after a step; on failure warn once and go on without checkpoints (returns None)."""
    import sys

    from clcompose.bench.runs import checkpoint

    summary = {"config_hash": loop["config_hash"], "next_step": loop["next_step"], "n_steps": loop["n_steps"]}
    try:
        checkpoint.save(path, session.strategy, loop, summary)
        return path
    except checkpoint.CheckpointError as exc:
        print(f"bench: warning: {exc}; this run continues without checkpoints", file=sys.stderr)
        checkpoint.remove(path)
        return None


def _record(
    resolved: ResolvedRun, session: _Session, loop: dict[str, Any], timing: dict, artifacts: list
) -> dict[str, Any]:
    import torch

    from clcompose.bench.io import utc_now
    from clcompose.bench.runs.record import SCHEMA_VERSION, environment
    from clcompose.strategies.metrics import continual as M

    cfg, matrix, n_exp = resolved.config, loop["matrix"], session.n_experiences
    if len(matrix) == n_exp:
        metrics = M.summarize(matrix)
    else:  # joint training: one step over the whole stream, so only final accuracies exist
        metrics = {
            "final_average_accuracy": float(sum(matrix[-1]) / n_exp),
            "forgetting": None,
            "bwt": None,
            "accuracy_curve": None,
        }
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "schema": SCHEMA_VERSION,
        "run_id": resolved.run_id(),
        "status": "complete",
        "created": utc_now(),
        "config": resolved.to_dict(),
        "config_hash": config_hash(resolved.to_dict()),
        "seeds": {"seed": cfg.seed, "stream_seed": cfg.stream_seed},
        "stream": session.benchmark.info | {"n_experiences": n_exp},
        "accuracy_matrix": matrix,
        "metrics": metrics,
        "timing": timing,
        "peak_memory_mb": round(peak_kb / 1024, 1),
        "peak_cuda_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "environment": environment(),
    }
    if isinstance(session.benchmark, ExtraMetrics):
        record["metrics"] = metrics | session.benchmark.extra_metrics(session.strategy)
    if isinstance(session.strategy, FinalMetrics):
        record["metrics"] = record["metrics"] | session.strategy.final_metrics(session.benchmark)
    if isinstance(session.strategy, RecordsExtras):
        record["strategy_extras"] = session.strategy.record_extras()
    if artifacts:
        record["artifacts"] = artifacts
    if loop.get("step_metrics"):
        record["step_metrics"] = loop["step_metrics"]
    if loop["resumes"]:
        record["resumes"] = loop["resumes"]
    return record


def default_record_path(resolved: ResolvedRun, runs_dir: str | Path = "runs") -> Path:
    return Path(runs_dir) / resolved.run_id() / "record.json"


def checkpoint_path_for(record_path: str | Path) -> Path:
    """Where the run that writes ``record_path`` keeps its checkpoint: ``checkpoint.pt`` in a run folder."""
    from clcompose.bench.runs.checkpoint import CHECKPOINT_NAME

    record_path = Path(record_path)
    if record_path.name == "record.json":
        return record_path.with_name(CHECKPOINT_NAME)
    return record_path.with_name(f"{record_path.stem}.{CHECKPOINT_NAME}")


def run(
    config: RunConfig | dict, out: str | Path | None = None, runs_dir: str | Path = "runs", progress: bool = True
) -> tuple[Path, dict]:
    """Validate, refuse an existing output path, train, and write the record atomically (never overwriting).

    The run checkpoints next to the record after every experience and resumes from such a checkpoint when one
    is there (an earlier, interrupted attempt); the checkpoint is deleted once the record is written.
    """
    from clcompose.bench.io import RecordExistsError, write_json_atomic
    from clcompose.bench.runs import checkpoint

    cfg = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    resolved = cfg.resolve()
    path = Path(out) if out is not None else default_record_path(resolved, runs_dir)
    if path.exists():
        raise RecordExistsError(f"{path} already exists; records are never overwritten (choose another --out)")
    ckpt = checkpoint_path_for(path)
    record = execute(resolved, progress=progress, artifacts_dir=path.parent, checkpoint_path=ckpt)
    write_json_atomic(path, record)
    checkpoint.remove(ckpt)
    return path, record
