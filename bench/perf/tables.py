"""``bench perf``'s output: ``perf.json`` (merged per section) and the Markdown tables of ``README.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clcompose.bench.io import write_text_atomic

TOP_LEVEL = ("schema", "created", "command", "code", "machine", "settings")  # perf.json's keys that are not sections


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows),
    ]


BREAKDOWN_COLUMNS = (
    ("θ0 pass", "theta0_s"),
    ("probe + statistics + anchor alignment", "consolidation_s"),
    ("Fisher", "fisher_s"),
    ("other preparation (head Fisher, …)", "other_preparation_s"),
    ("post-training alignment", "align_trained_s"),
    ("regulariser steps", "regularizer_step_s"),
    ("rest (training iterations, …)", "rest_s"),
)


def _breakdown(summary: dict[str, Any], first: str) -> list[str]:
    """Where each strategy's training time per experience goes, against ``first``'s (naive's) whole time."""
    with_parts = {k: v for k, v in summary.items() if v.get("breakdown_per_experience_s")}
    if not with_parts or first not in summary:
        return []
    base = summary[first]["train_wall_per_experience_s"]
    lines = [
        f"Where the training time per experience goes (seconds; in brackets, × {first}'s whole training time of "
        f"{_fmt(base)} s). The rest is the training iterations and whatever else the step does (task arithmetic's "
        "λ selection on held-out data, for one); over it, each strategy's own phases are added work.",
        "",
    ]
    rows = []
    for name, v in with_parts.items():
        parts = v["breakdown_per_experience_s"]
        rows.append(
            [name, v["train_wall_per_experience_s"]]
            + [f"{_fmt(parts[key])} ({_fmt(parts[key] / base if base else None)})" for _, key in BREAKDOWN_COLUMNS]
        )
    return lines + _table(["strategy", "train s/exp"] + [h for h, _ in BREAKDOWN_COLUMNS], rows) + [""]


def _provenance(section: dict[str, Any], result: dict[str, Any]) -> list[str]:
    """A line naming the command, commit and machine load of a section measured apart from the page's command."""
    m = section.get("measured")
    if not m or m.get("command") == result.get("command"):
        return []
    code = (m.get("code") or {}).get("commit")
    load = (m.get("machine") or {}).get("load_average")
    return [
        f"Measured apart, by `{m['command']}` at {m.get('created')}"
        f"{f', code {code[:7]}' if code else ''}{f', load average {load} at the end' if load else ''}.",
        "",
    ]


def _compose(c: dict[str, Any] | None, result: dict[str, Any]) -> list[str]:
    """The composed network's forward and training step against a plain network's."""
    if not c:
        return []
    lines = [
        f"## Composed forward against a plain forward ({c['backbone']}, eval batch {c['eval_batch']}, training "
        f"batch {c['train_batch']}, median of {c['rounds']} interleaved rounds)",
        "",
        *_provenance(c, result),
        "Evaluation: the composed network (θ0 + Σ_t τ_t / T materialised once per evaluation, cached, run through "
        "`functional_call`) against a plain copy of the backbone holding the same weights, on one batch; the "
        "materialisation, paid once per evaluation, in units of that plain forward; the largest difference of "
        "the logits. Training: one step (forward, cross-entropy, backward) at θ0 + τ_T, gradients for τ_T and the "
        "head, against naive fine-tuning's step on the plain copy (every weight trainable; the optimiser's step "
        "is not included).",
        "",
    ]
    header = ["style", "T", "trainable/task", "eval composed s", "eval plain s", "eval overhead"]
    header += ["materialise s", "materialise × forward", "max |Δ logit|", "train step composed s", "train step plain s"]
    rows = [
        [r["style"], r["tasks"], r["trainable_per_task"], r["eval_composed_s"], r["eval_plain_s"]]
        + [f"{100 * r['eval_overhead']:+.1f} %", r["materialise_s"], r["materialise_vs_forward"]]
        + [f"{r['max_abs_logit_diff']:.1e}", r["train_composed_s"], r["train_plain_s"]]
        for r in c["rows"]
    ]
    header.append("train × plain")
    rows = [row + [r["train_ratio"]] for row, r in zip(rows, c["rows"])]
    return lines + _table(header, rows) + [""]


def _budgets(b: dict[str, Any] | None, result: dict[str, Any]) -> list[str]:
    """Training time per experience against the epoch budget: the ratios, the fixed/per-epoch split, the pooled
    cost model."""
    if not b:
        return []
    first, target = b["strategies"][0], b["target"]
    lines = [
        f"## Cost against the epoch budget ({', '.join(map(str, b['epochs']))} epochs per experience, "
        f"{b['repeats']} repeat(s), overrides {json.dumps(b['overrides'])})",
        "",
        *_provenance(b, result),
        f"Training time per experience and its ratio to {first}'s, at each budget, measured side by side; its fixed "
        "part (θ0 pass, probe + statistics + anchor alignment, Fisher, other preparation, post-training alignment: "
        "none depends on the epochs) and its part per epoch (training iterations and regulariser steps, divided "
        f"by the epochs). Then, per strategy, time = fixed + per epoch × epochs with the fixed part averaged over the "
        "budgets and the part per epoch pooled (weighted by the epochs): the ratio it tends to with many epochs, and "
        f"the budget from which it is within {target} × {first} (– when never).",
        "",
    ]
    rows = [
        [r["epochs"], r["strategy"], r["train_per_experience_s"], r["relative_to_" + first]]
        + [r["fixed_per_experience_s"], r["per_epoch_s"], r["fisher_per_experience_s"], r["final_average_accuracy"]]
        for r in b["rows"]
    ]
    header = ["epochs", "strategy", "train s/exp", f"× {first}", "fixed s/exp", "per epoch s", "Fisher s/exp"]
    lines += _table(header + ["final acc"], rows) + [""]
    model = [
        [name, m["fixed_s"], m["per_epoch_s"], m["asymptotic_ratio"], m["epochs_within_target"]]
        for name, m in b["model"].items()
    ]
    header = ["strategy", "fixed s/exp", "s per epoch", f"× {first} at many epochs"]
    lines += _table(header + [f"epochs to ≤ {target} × {first}"], model) + [""]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Tables of every section present in ``result``."""
    lines = ["# Performance of the suite", "", f"Measured by `{result.get('command', 'bench perf')}`", ""]
    code = (result.get("code") or {}).get("commit")
    if code:
        lines[-2] += f" at code {code[:7]}{' with local changes' if result['code'].get('dirty') else ''}"
    lines[-2] += " (the latest command; a section that another command measured says so under its heading)."
    m = result.get("machine") or {}
    lines += [
        f"Machine: {m.get('cpus')} CPUs ({m.get('torch_threads')} torch thread(s)), device {m.get('device')}"
        f"{' (' + m['cuda'] + ')' if m.get('cuda') else ''}, Python {m.get('python')}, torch {m.get('torch')}, "
        f"load average {m.get('load_average')} at the end (other work shares the machine: read the ratios, "
        "measured side by side in one process, rather than the seconds).",
        "",
    ]
    s = result.get("strategies")
    if s:
        first = next(iter(s["summary"]))
        lines += [
            f"## Strategies side by side ({s['benchmark']}, {s['backbone']}, {s['repeats']} repeat(s), "
            f"overrides {json.dumps(s['overrides'])})",
            "",
            *_provenance(s, result),
            "Per experience: training wall time (preparation included), relative to naive; of it, the θ0 pass and "
            "the Fisher; evaluation (its wall time less the diagnostics, which run inside it) and diagnostics, both "
            "recorded apart from training; peak memory of the run.",
            "",
        ]
        rows = [
            [
                name,
                v["train_wall_per_experience_s"],
                v["relative_to_" + first],
                v["theta0_per_experience_s"],
                v["fisher_per_experience_s"],
                v["fisher_share"],
                v.get("evaluation_per_experience_s", v["eval_wall_per_experience_s"]),
                v["diagnostics_per_experience_s"],
                v["peak_memory_mb"],
                v["final_average_accuracy"],
            ]
            for name, v in s["summary"].items()
        ]
        header = ["strategy", "train s/exp", f"× {first}", "θ0 pass s", "Fisher s", "Fisher share", "eval s/exp"]
        lines += _table(header + ["diagnostics s/exp", "peak MB", "final acc"], rows) + [""]
        lines += _breakdown(s["summary"], first)
    lines += _budgets(result.get("budgets"), result)
    lines += _compose(result.get("compose"), result)
    f = result.get("fisher")
    if f:
        modes = [k[len("batched_vs_floor_") :] for k in f["rows"][0] if k.startswith("batched_vs_floor_")]
        lines += [
            f"## Fisher per example against one batched forward + backward per label ({f['backbone']}, "
            f"{f['classes']} classes, median of {f['repeats']})",
            "",
            *_provenance(f, result),
        ]
        header = ["examples"] + [f"{m} batched s" for m in modes] + [f"{m} × floor" for m in modes]
        header += [f"{m} ms/example" for m in modes]
        rows = [
            [r["examples"]]
            + [r[f"batched_{m}_s"] for m in modes]
            + [r[f"batched_vs_floor_{m}"] for m in modes]
            + [r[f"batched_per_example_ms_{m}"] for m in modes]
            for r in f["rows"]
        ]
        lines += _table(header, rows) + [""]
    sc = result.get("scaling")
    if sc:
        fs, ex = sc["fisher"], sc["experiences"]
        lines += [
            f"## Scaling: exact Fisher against examples ({fs['backbone']}, {fs['classes']} classes), fitted exponent "
            f"{_fmt(fs['exponent'])}",
            "",
            *_provenance(sc, result),
        ]
        lines += _table(
            ["examples", "Fisher s", "s per 1000 examples"],
            [
                [f"{r['examples']}{' (all)' if r['all'] else ''}", r["fisher_s"], 1000 * r["fisher_s"] / r["examples"]]
                for r in fs["rows"]
            ],
        )
        lines += [
            "",
            f"## Scaling: time against experiences ({ex['benchmark']}, {ex['strategy']}, "
            f"{ex['examples_per_experience']} training examples per experience)",
            "",
            "Fitted exponents b of time ∝ experiences^b (1: linear) per alignment schedule: `align_epochs_per_task` "
            "5 is the reference's (experience t aligns the classifier for 10 + 5t epochs over samples of every "
            "class seen, so it grows by design), 0 a fixed number of epochs. Evaluation fills the T × T accuracy "
            "matrix and the diagnostics of step t cost O(t) (linear in the experiences composed), so both totals are "
            "quadratic; evaluation per matrix entry and training per experience are what should stay flat. "
            "Evaluation excludes the diagnostics, which run inside it; the total is training + evaluation + "
            "diagnostics.",
            "",
        ]
        exponent_columns = [
            ("training", "train_s"),
            ("training per experience", "train_per_experience_s"),
            ("evaluation", "eval_s"),
            ("eval per entry", "eval_per_entry_ms"),
            ("diagnostics", "diagnostics_s"),
            ("total", "total_s"),
        ]
        lines += _table(
            ["align_epochs_per_task"] + [h for h, _ in exponent_columns],
            [[k] + [e[key] for _, key in exponent_columns] for k, e in ex["exponents"].items()],
        )
        lines.append("")
        row_columns = [
            ("align_epochs_per_task", "align_epochs_per_task"),
            ("experiences", "experiences"),
            ("training s", "train_s"),
            ("training s/exp", "train_per_experience_s"),
            ("evaluation s", "eval_s"),
            ("eval ms/entry", "eval_per_entry_ms"),
            ("diagnostics s", "diagnostics_s"),
            ("total s", "total_s"),
        ]
        lines += _table([h for h, _ in row_columns], [[r[key] for _, key in row_columns] for r in ex["rows"]])
        lines.append("")
    c = result.get("cli")
    if c:
        lines += [f"## Command-line latency (median of {c['runs']}; cold: empty caches, every module recompiled)", ""]
        lines += _provenance(c, result)
        lines += _table(["command", "cold s", "warm s"], [[r["command"], r["cold_s"], r["warm_s"]] for r in c["rows"]])
        lines.append("")
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Merge ``result``'s sections into ``out/perf.json`` and rewrite ``out/README.md`` from the merged file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perf.json"
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text())
        except ValueError:
            merged = {}
    top = {k: merged.get(k) for k in ("command", "created", "code", "machine", "settings")}
    for key, section in merged.items():  # sections of a file written before sections kept their own provenance
        if key not in TOP_LEVEL and isinstance(section, dict) and "measured" not in section and top["command"]:
            section["measured"] = top
    merged.update(result)
    write_text_atomic(path, json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
    page = out / "README.md"
    write_text_atomic(page, markdown(merged))
    return path, page
