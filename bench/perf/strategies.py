"""Side-by-side cost of ITA / IEL against naive fine-tuning on the same stream, epochs and thread count.

    python -m clcompose.bench.perf.strategies [--benchmark split-fmnist --backbone efficientnet-lite0 --repeats 2]

Runs the strategies interleaved in one process (naive, ita, iel, naive, ita, iel, …) so that machine noise
hits all of them alike, and reports per-experience training wall time (which includes each strategy's
preparation: pre-consolidation and the Fisher pass) relative to naive, and the Fisher pass's share of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def measure(
    benchmark: str,
    backbone: str,
    strategies: list[str],
    repeats: int,
    per_class: int,
    epochs: int,
    extra: dict[str, dict],
    backbone_options: dict,
) -> dict:
    from clcompose.bench.runs.config import RunConfig
    from clcompose.bench.runs.run import execute

    rows: dict[str, list[dict]] = {s: [] for s in strategies}
    for r in range(repeats):
        for name in strategies:
            cfg = RunConfig.from_dict(
                {
                    "benchmark": benchmark,
                    "backbone": backbone,
                    "strategy": name,
                    "seed": r,
                    "benchmark_options": {"n_experiences": 5, "per_class": per_class, "test_per_class": 20},
                    "backbone_options": backbone_options,
                    "strategy_options": extra.get(name, {}),
                    "train": {"epochs": epochs, "batch_size": 32, "optimizer": "adamw", "lr": 1e-3},
                }
            )
            rec = execute(cfg.resolve(), progress=False)
            prep = (rec.get("strategy_extras") or {}).get("preparation") or []
            for step in rec["timing"]["steps"]:
                fisher = next((p.get("fisher_s", 0.0) for p in prep if p["experience"] == step["step"]), 0.0)
                rows[name].append(
                    {"repeat": r, "experience": step["step"], "train_wall_s": step["train_wall_s"], "fisher_s": fisher}
                )
            print(
                f"  {name} repeat {r}: {sum(s['train_wall_s'] for s in rec['timing']['steps']):.1f} s training",
                file=sys.stderr,
            )
    base = statistics.mean(x["train_wall_s"] for x in rows[strategies[0]])
    summary = {}
    for name, xs in rows.items():
        wall = statistics.mean(x["train_wall_s"] for x in xs)
        fisher = statistics.mean(x["fisher_s"] for x in xs)
        summary[name] = {
            "train_wall_per_experience_s": round(wall, 3),
            "relative_to_" + strategies[0]: round(wall / base, 3),
            "fisher_per_experience_s": round(fisher, 3),
            "fisher_share": round(fisher / wall, 3) if wall else None,
        }
    return {
        "benchmark": benchmark,
        "backbone": backbone,
        "repeats": repeats,
        "per_class": per_class,
        "epochs": epochs,
        "summary": summary,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    import clcompose.strategies  # noqa: F401

    p = argparse.ArgumentParser(prog="python -m clcompose.bench.perf.strategies", description=__doc__.splitlines()[0])
    p.add_argument("--benchmark", default="split-fmnist")
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--strategies", default="naive,ita,iel")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fisher", default=None, help="override the Fisher estimator of ita/iel (exact, topk, sampled)")
    p.add_argument("--out", help="write the measurements as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = args.strategies.split(",")
    extra = {n: ({"fisher": args.fisher} if args.fisher else {}) for n in names if n in ("ita", "iel")}
    result = measure(args.benchmark, args.backbone, names, args.repeats, args.per_class, args.epochs, extra, {})
    for name, s in result["summary"].items():
        print(
            f"{name:8s} {s['train_wall_per_experience_s']:8.2f} s/experience  ×{s['relative_to_' + names[0]]:.2f}  "
            f"Fisher {s['fisher_per_experience_s']:.2f} s ({(s['fisher_share'] or 0) * 100:.0f} %)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
