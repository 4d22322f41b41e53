"""ITA's and IEL's cost against the epoch budget: naive, ITA and IEL side by side at several epochs per experience.

What ITA and IEL add over fine-tuning is of two kinds. Per experience, once: the θ0 pass, the probe and class
statistics, the two classifier alignments of the reference's pre-consolidation and the Fisher — none of which
depends on the number of epochs. Per epoch: their training iterations and regulariser steps. The main job trains
2 epochs, where the fixed part weighs most; the paper trains 20 (Split CIFAR-100) or 5 (CropDiseases). For each
budget in ``epochs`` this runs :func:`clcompose.bench.perf.strategies.measure` (the strategies interleaved in one
process on the main job, with the reference's exact Fisher over every example by default) and reports, per
strategy, the training time per experience, its ratio to the first strategy's (naive's), and its split into the
fixed part and the per-epoch part, each measured within the run. Pooled over the budgets (the fixed part averaged,
the per-epoch part weighted by the epochs), time = fixed + per epoch × epochs gives each strategy's ratio to naive
at many epochs and the smallest budget at which it is within ``target`` × naive. A measurement, not a test.
"""

from __future__ import annotations

import sys
from typing import Any

STRATEGIES = ("naive", "ita", "iel")
# the phases of experience_rows that do not depend on the number of epochs
FIXED = ("theta0_s", "consolidation_s", "fisher_s", "other_preparation_s", "align_trained_s")
PER_EPOCH = ("regularizer_step_s", "rest_s")


def break_even(cost: tuple[float, float], base: tuple[float, float], target: float) -> float | None:
    """The smallest epochs E ≥ 0 with a + b E ≤ target (a₀ + b₀ E), for (fixed, per epoch) = (a, b) of a strategy
    and (a₀, b₀) of the base; None when it never gets there (its per-epoch cost is at or above target × the base's)."""
    (a, b), (a0, b0) = cost, base
    if a <= target * a0:
        return 0.0
    if b >= target * b0:
        return None
    return (a - target * a0) / (target * b0 - b)


def measure(
    epochs: list[int],
    strategies: list[str] | tuple[str, ...] = STRATEGIES,
    repeats: int = 1,
    overrides: dict[str, Any] | None = None,
    device: str = "cpu",
    target: float = 1.3,
    progress: bool = True,
) -> dict[str, Any]:
    """Rows per (epochs, strategy) and each strategy's pooled cost model and break-even budget (module docstring)."""
    from clcompose.bench.perf.strategies import measure as side_by_side

    overrides = overrides or {}
    rows, first = [], strategies[0]
    parts_of: dict[str, list[tuple[float, float, int]]] = {name: [] for name in strategies}  # (fixed, per epochs, E)
    for i, budget in enumerate(epochs):
        if progress:
            print(f"  {budget} epoch(s) per experience", file=sys.stderr)
        run = overrides | {"train": overrides.get("train", {}) | {"epochs": budget}}
        summary = side_by_side(strategies, repeats, run, device, progress=progress, warmup=i == 0)["summary"]
        for name, v in summary.items():
            parts = v["breakdown_per_experience_s"]
            fixed, per_epochs = sum(parts[k] for k in FIXED), sum(parts[k] for k in PER_EPOCH)
            parts_of[name].append((fixed, per_epochs, budget))
            rows.append(
                {
                    "epochs": budget,
                    "strategy": name,
                    "train_per_experience_s": v["train_wall_per_experience_s"],
                    "relative_to_" + first: v["relative_to_" + first],
                    "fixed_per_experience_s": round(fixed, 3),
                    "per_epoch_s": round(per_epochs / budget, 3),
                    "fisher_per_experience_s": v["fisher_per_experience_s"],
                    "final_average_accuracy": v["final_average_accuracy"],
                }
            )
    models = {}  # per strategy: its fixed seconds per experience and its seconds per epoch, pooled over the budgets
    for name, mine in parts_of.items():
        fixed = sum(f for f, _, _ in mine) / len(mine)
        models[name] = (fixed, sum(p for _, p, _ in mine) / sum(e for _, _, e in mine))
    base = models[first]
    model = {}
    for name, (fixed, per_epoch) in models.items():
        even = break_even((fixed, per_epoch), base, target)
        model[name] = {
            "fixed_s": round(fixed, 3),
            "per_epoch_s": round(per_epoch, 3),
            "asymptotic_ratio": round(per_epoch / base[1], 3) if base[1] > 0 else None,
            "epochs_within_target": None if even is None else round(even, 1),
        }
    return {
        "epochs": list(epochs),
        "strategies": list(strategies),
        "repeats": repeats,
        "overrides": overrides,
        "device": device,
        "target": target,
        "rows": rows,
        "model": model,
    }
