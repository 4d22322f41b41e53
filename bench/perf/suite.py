"""``bench perf strategies|budgets|compose|fisher|scaling|cli|all``: the cost of the suite's strategies, written to JSON + Markdown.

- ``strategies``: naive, ITA, IEL and task arithmetic interleaved in one process on the main job
  (:mod:`.strategies`), by default with the reference's exact Fisher over every example of each experience;
- ``budgets``: naive, ITA and IEL the same way at several epoch budgets (2, 5, 20: the main job's, CropDiseases'
  and Split CIFAR-100's in the paper), split into the fixed cost per experience and the cost per epoch
  (:mod:`.budgets`);
- ``fisher``: the batched Fisher per example against one batched forward + backward per label (:mod:`.fisher`);
- ``scaling``: Fisher time against the number of examples (64, 256, 1024 and all of one main-job experience) and
  total time against the number of experiences (5, 10, 20 on the 20-class split-mnist5k-animal stream with the
  small CNN, the same examples per experience), each with the fitted exponent b of time ∝ size^b (1: linear).
  The experiences table is measured under two alignment schedules: the reference's (``align_epochs`` +
  ``align_epochs_per_task`` · t epochs over samples of every class seen, so experience t costs O(t²) and the
  stream O(T³) by design) and a fixed one (``align_epochs_per_task = 0``); evaluation fills a T × T accuracy
  matrix, so it is also reported per matrix entry;
- ``compose``: the composed network's forward and training step against a plain network holding the same
  weights, per tuning style and number of task vectors (:mod:`.compose`);
- ``cli``: ``bench list`` and ``--help`` latencies, cold and warm (:mod:`.cli`);
- ``all``: the six.

The result goes to ``OUT/perf.json`` (merged with what is there: a benchmark run alone replaces its own
section; each section keeps the command, time, commit and machine that measured it, under ``measured``) and
``OUT/README.md`` (tables). Timings are of this machine under its load; the ratios are measured
side by side in one process and are what counts.
"""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

SCHEMA = 1
BENCHMARKS = ("strategies", "budgets", "compose", "fisher", "scaling", "cli")
# the experiences table's columns that get a fitted exponent (time ∝ experiences^b)
EXPONENT_KEYS = ("train_s", "train_per_experience_s", "eval_s", "eval_per_entry_ms", "diagnostics_s", "total_s")


def fitted_exponent(sizes: list[float], times: list[float]) -> float | None:
    """b of the least-squares fit log t = a + b log n (1: linear growth, 2: quadratic); None below two sizes."""
    points = [(math.log(n), math.log(t)) for n, t in zip(sizes, times) if n > 0 and t > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return round(sum((x - mx) * (y - my) for x, y in points) / var, 3) if var > 0 else None


def _experience_examples(job: dict[str, Any], n_experiences: int | None = None) -> int:
    """Training examples of one experience of the main job (per_class × classes per experience, 10 classes)."""
    opts = job["benchmark_options"]
    return int(opts.get("per_class") or 100) * 10 // int(n_experiences or opts.get("n_experiences") or 5)


def scaling(settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Fisher seconds against examples, total seconds against experiences (see the module docstring)."""
    from clcompose.bench.perf import fisher
    from clcompose.bench.perf.strategies import experience_rows, main_job
    from clcompose.bench.runs.config import RunConfig
    from clcompose.bench.runs.run import execute

    job = main_job()
    every = _experience_examples(job)
    examples = sorted({every if n == "all" else int(n) for n in settings["scaling_examples"]})
    f = fisher.measure(
        job["backbone"],
        settings["scaling_classes"],
        examples,
        1,
        int(job["backbone_options"].get("image_size", 32)),
        256,
        vmap=False,
        modes=("exact",),
        device=settings["device"],
        progress=progress,
        backbone_options=job["backbone_options"],
    )
    fisher_rows = [
        {"examples": r["examples"], "fisher_s": r["batched_exact_s"], "all": r["examples"] == every} for r in f["rows"]
    ]
    per_experience = settings["scaling_examples_per_experience"]
    experience_rows_out, by_schedule = [], {}
    for schedule in settings["scaling_align_epochs_per_task"]:
        rows = []
        for n in settings["scaling_experiences"]:
            classes = 20 // n
            cfg = {
                "benchmark": "split-mnist5k-animal",
                "backbone": "small-cnn",
                "strategy": settings["scaling_strategy"],
                "seed": 0,
                "benchmark_options": {
                    "n_experiences": n,
                    "per_class": max(1, per_experience // classes),
                    "test_per_class": max(1, settings["scaling_test_per_experience"] // classes),
                },
                "backbone_options": settings["scaling_backbone_options"],
                "strategy_options": {"align_epochs_per_task": schedule},
                "train": {"epochs": 1, "batch_size": 16, "optimizer": "adamw", "lr": 1e-3},
                "device": settings["device"],
            }
            rec = execute(RunConfig.from_dict(cfg).resolve(), progress=False)
            steps = experience_rows(rec)
            train_s = sum(s["train_wall_s"] for s in steps)
            eval_s = sum(s["evaluation_s"] for s in steps)  # the diagnostics apart
            diagnostics_s = sum(s["diagnostics_s"] for s in steps)
            row = {
                "align_epochs_per_task": schedule,
                "experiences": n,
                "train_s": round(train_s, 3),
                "train_per_experience_s": round(train_s / n, 3),
                "eval_s": round(eval_s, 3),
                "eval_per_entry_ms": round(1000 * eval_s / (n * n), 3),  # one entry = one test experience scored
                "diagnostics_s": round(diagnostics_s, 3),
                "total_s": round(train_s + eval_s + diagnostics_s, 3),  # set-up excluded
            }
            rows.append(row)
            if progress:
                print(f"  {n} experiences: {row}", file=sys.stderr)
        sizes = [r["experiences"] for r in rows]
        by_schedule[str(schedule)] = {k: fitted_exponent(sizes, [r[k] for r in rows]) for k in EXPONENT_KEYS}
        experience_rows_out += rows
    return {
        "fisher": {
            "backbone": job["backbone"],
            "classes": settings["scaling_classes"],
            "rows": fisher_rows,
            "exponent": fitted_exponent([r["examples"] for r in fisher_rows], [r["fisher_s"] for r in fisher_rows]),
        },
        "experiences": {
            "benchmark": "split-mnist5k-animal",
            "strategy": settings["scaling_strategy"],
            "examples_per_experience": per_experience,
            "rows": experience_rows_out,
            "exponents": by_schedule,  # per alignment schedule (align_epochs_per_task)
        },
    }


def _overrides(settings: dict[str, Any]) -> dict[str, Any]:
    """The main job's overrides of the strategies benchmarks: stream size, epochs and ITA/IEL's Fisher."""
    return {
        "benchmark_options": {k: settings[k] for k in ("per_class", "test_per_class", "n_experiences") if settings[k]},
        "train": {"epochs": settings["epochs"]} if settings["epochs"] else {},
        "strategy_options": {"fisher": settings["fisher"], "fisher_max_examples": settings["fisher_max_examples"]},
    }


def run_benchmarks(what: str, settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The sections of ``what`` (one of :data:`BENCHMARKS` or ``all``) measured with ``settings``."""
    import torch

    torch.set_num_threads(settings["threads"])
    out: dict[str, Any] = {}
    names = BENCHMARKS if what == "all" else (what,)
    if "cli" in names:
        from clcompose.bench.perf.cli import measure

        out["cli"] = measure(settings["cli_runs"])
    if "strategies" in names:
        from clcompose.bench.perf.strategies import measure

        out["strategies"] = measure(
            settings["strategies"], settings["repeats"], _overrides(settings), settings["device"], progress=progress
        )
    if "budgets" in names:
        from clcompose.bench.perf import budgets

        overrides = _overrides(settings)
        overrides["train"].pop("epochs", None)  # each budget sets its own
        out["budgets"] = budgets.measure(
            settings["budget_epochs"],
            settings["budget_strategies"],
            settings["repeats"],
            overrides,
            settings["device"],
            progress=progress,
        )
    if "compose" in names:
        from clcompose.bench.perf import compose

        out["compose"] = compose.measure(
            settings["compose_styles"],
            settings["compose_tasks"],
            settings["compose_rounds"],
            settings["compose_eval_batch"],
            settings["device"],
            progress,
        )
    if "fisher" in names:
        from clcompose.bench.perf import fisher
        from clcompose.bench.perf.strategies import main_job

        job = main_job()
        out["fisher"] = fisher.measure(
            job["backbone"],
            settings["fisher_classes"],
            [_experience_examples(job) if n == "all" else int(n) for n in settings["fisher_examples"]],
            settings["repeats"],
            int(job["backbone_options"].get("image_size", 32)),
            256,
            vmap=settings["vmap"],
            device=settings["device"],
            progress=progress,
            backbone_options=job["backbone_options"],
        )
    if "scaling" in names:
        out["scaling"] = scaling(settings, progress)
    return out


def machine(device: str) -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(v, 2) for v in load] if load else None,
    }


DEFAULTS: dict[str, Any] = {
    "strategies": ["naive", "ita", "iel", "task-arithmetic"],
    "repeats": 1,
    "per_class": None,  # None: the main job's
    "test_per_class": None,
    "n_experiences": None,
    "epochs": None,
    "fisher": "exact",
    "budget_epochs": [2, 5, 20],  # the main job's; the paper's CropDiseases and Split CIFAR-100
    "budget_strategies": ["naive", "ita", "iel"],
    "fisher_max_examples": None,  # every example of the experience (the reference's setting)
    "fisher_examples": [64, "all"],
    "fisher_classes": 10,
    "vmap": False,
    "scaling_examples": [64, 256, 1024, "all"],
    "scaling_classes": 2,  # the first experience's softmax (two seen classes)
    "scaling_experiences": [5, 10, 20],
    "scaling_strategy": "ita",
    "scaling_align_epochs_per_task": [5, 0],  # the reference's growing alignment schedule, then a fixed one
    "scaling_examples_per_experience": 40,
    "scaling_test_per_experience": 20,
    "scaling_backbone_options": {"source": "fmnist", "pretrain_epochs": 1, "width": 8, "input_size": 16},
    "compose_styles": ["lora", "ia3", "full"],
    "compose_tasks": [1, 5, 20],
    "compose_rounds": 7,
    "compose_eval_batch": 256,  # the runs' eval batch size
    "cli_runs": 3,
    "device": "cpu",
    "threads": 1,
}


def main(what: str, out: Path, settings: dict[str, Any], command: str = "bench perf", progress: bool = True) -> int:
    """Measure ``what`` with ``DEFAULTS | settings``, print the tables and write ``out/perf.json`` and
    ``out/README.md``."""
    from clcompose.bench.io import utc_now
    from clcompose.bench.perf.tables import markdown, write
    from clcompose.bench.runs.record import git_commit

    settings = DEFAULTS | {k: v for k, v in settings.items() if v is not None}
    result: dict[str, Any] = {"schema": SCHEMA, "created": utc_now(), "command": command}
    sections = run_benchmarks(what, settings, progress)
    result["machine"] = machine(settings["device"])
    result["settings"] = settings
    code = result["code"] = git_commit()
    for section in sections.values():  # perf.json merges sections from several commands: each keeps its own
        section["measured"] = {"command": command, "created": result["created"], "code": code}
        section["measured"] |= {"machine": result["machine"], "settings": settings}
    result.update(sections)
    path, page = write(result, Path(out))
    print(markdown(result))
    print(f"→ {path}, {page}")
    return 0
