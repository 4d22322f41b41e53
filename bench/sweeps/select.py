"""Hyperparameter selection on validation data, and sweeps that run with the selected values.

A *selection sweep* is a sweep file with a ``select:`` block; its benchmarks evaluate on a validation split held
out of every training experience (``benchmarks.<name>.validation: 0.2``; the test set is never read), and its
strategies carry small grids::

    select: {rule: final_average_accuracy, out: results/selection}
    benchmarks: {split-fmnist: {n_experiences: 5, per_class: 100, validation: 0.2}}
    strategies:
      naive: {train: {lr: {grid: [0.0001, 0.0005, 0.002]}, epochs: {grid: [2, 5]}}}
      ita: {alpha: {grid: [0.01, 0.1, 1.0]}}

``bench select FILE`` reads its finished records and writes ``<out>/selected.json``: per benchmark and strategy
entry, every grid point's score (the rule: the mean over the sweep's seeds of the final average accuracy on the
validation stream), the winner (the highest score; ties: the first in grid order) and the rule. A final sweep
names that file (``selected: results/selection/selected.json``, relative to the working directory) and each of
its strategy entries starts from the winner of the entry of the same key, or else of the same strategy
(``ita@alpha0`` → ``ita``): the entry's own options win over the winner's, so ``ita@alpha0: {alpha: 0}`` is ITA
with the selected learning rate and no regulariser, a control. ``selected_from: naive`` in an entry takes another
entry's winner instead (e.g. SLCA's naive-with-alignment control at naive's selected learning rate).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clcompose.bench.io import display_path, read_json, utc_now, write_json_atomic, write_text_atomic
from clcompose.strategies.core.registry import ConfigError

RULES = {
    "final_average_accuracy": (
        "the mean over the selection seeds of the final average accuracy on the validation stream "
        "(held out of each training experience; the test set is never read); ties: the first in grid order"
    )
}
SELECT_KEYS = ("rule", "out")
SECTIONS = ("strategy", "train")  # what a selection grid may vary (benchmark and backbone stay fixed)
FORMAT = "clcompose-selection/1"


def split_entry(key: str) -> tuple[str, str]:
    """``"ita@alpha0"`` → ``("ita", "alpha0")``; ``"ita"`` → ``("ita", "")``."""
    name, _, tag = str(key).partition("@")
    return name, tag


def check_select(data: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The validated ``select:`` block of a sweep file (``None`` when the sweep selects nothing)."""
    block = data.get("select")
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: select must be a mapping ({', '.join(SELECT_KEYS)}), got {block!r}")
    unknown = sorted(set(block) - set(SELECT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: select: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SELECT_KEYS)}")
    rule = block.get("rule", "final_average_accuracy")
    if rule not in RULES:
        raise ConfigError(f"{where}: select.rule: unknown rule {rule!r}; valid: {', '.join(RULES)}")
    out = block.get("out", "results/selection")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"{where}: select.out must be a folder path, got {out!r}")
    if data.get("selected") is not None:
        raise ConfigError(f"{where}: a selection sweep (select:) cannot itself start from selected values")
    benchmarks = data.get("benchmarks")
    for name, opts in benchmarks.items() if isinstance(benchmarks, dict) else []:
        if not isinstance(opts, dict) or opts.get("validation") is None:
            raise ConfigError(
                f"{where}: select: benchmarks.{name} must evaluate on validation data held out of the training "
                f"experiences (set benchmarks.{name}.validation, e.g. 0.2), never on the test stream"
            )
    return {"rule": rule, "out": out}


def load_selected(value: Any, where: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The winners of a ``selected:`` file: ``{benchmark: {entry: {"strategy": {...}, "train": {...}}}}``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: selected must name a selection file (bench select's selected.json), got {value!r}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{where}: selected: {display_path(path)} does not exist; run the selection sweep and `bench select` first"
        )
    try:
        payload = read_json(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: selected: {display_path(path)} is not a selection file ({exc})") from None
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or not isinstance(payload.get("benchmarks"), dict)
    ):
        raise ConfigError(f"{where}: selected: {display_path(path)} is not a selection file written by `bench select`")
    winners: dict[str, dict[str, dict[str, Any]]] = {}
    for bench, entries in payload["benchmarks"].items():
        winners[bench] = {}
        for entry, result in (entries or {}).items():
            chosen = result.get("chosen") if isinstance(result, dict) else None
            if not isinstance(chosen, dict) or not all(isinstance(chosen.get(s, {}), dict) for s in SECTIONS):
                raise ConfigError(f"{where}: selected: {display_path(path)}: {bench}.{entry} has no valid winner")
            winners[bench][entry] = {s: dict(chosen.get(s, {})) for s in SECTIONS}
    return winners


def winner_for(
    winners: dict | None, benchmark: str, entry: str, strict: bool = False, where: str = ""
) -> dict[str, dict[str, Any]] | None:
    """The selected values an entry of a final sweep starts from (its own key first, then its strategy's;
    ``strict``: exactly ``entry``, which must exist — an entry's ``selected_from: naive``)."""
    table = (winners or {}).get(benchmark, {})
    if strict:
        if entry not in table:
            known = ", ".join(sorted(table)) or "none"
            raise ConfigError(f"{where}: selected_from: {entry!r} has no winner for {benchmark} (selected: {known})")
        return table[entry]
    return table.get(entry) or table.get(split_entry(entry)[0])


def _score(record: dict[str, Any]) -> float:
    value = record["metrics"]["final_average_accuracy"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"final_average_accuracy is {value!r}")
    return float(value)


def choose(sweep) -> dict[str, Any]:
    """Score every grid point of a finished selection sweep and pick each entry's winner (see :data:`RULES`)."""
    block = check_select(sweep.data, str(sweep.path))
    if block is None:
        raise ConfigError(f"{sweep.path}: has no select: block (it is not a selection sweep)")
    missing, groups = [], {}
    for cell in sweep.cells:
        record = read_json(cell.record_path) if cell.record_path.is_file() else None
        if record is None:
            missing.append(cell.label)
            continue
        try:
            score = _score(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{display_path(cell.record_path)}: not a usable record ({exc})") from None
        bench = cell.config["benchmark"]
        values = {s: dict(cell.varied.get(s, {})) for s in SECTIONS}
        key = (bench, cell.entry, json.dumps(values, sort_keys=True))
        group = groups.setdefault(key, {"values": values, "scores": [], "seeds": []})
        group["scores"].append(score)
        group["seeds"].append(cell.config["seed"])
    if missing:
        raise ConfigError(
            f"{sweep.path}: {len(missing)} of {len(sweep.cells)} selection cells have no record yet "
            f"(e.g. {missing[0]}); run `bench sweep {sweep.path}` first"
        )
    out: dict[str, Any] = {"format": FORMAT, "rule": block["rule"], "rule_text": RULES[block["rule"]]}
    out |= {"source": display_path(sweep.path), "written": utc_now(), "benchmarks": {}}
    for (bench, entry, _), group in groups.items():  # cells come in grid order, so the first best is kept
        scores = group.pop("scores")
        row = group | {"score": sum(scores) / len(scores), "n_seeds": len(scores), "per_seed": scores}
        table = out["benchmarks"].setdefault(bench, {}).setdefault(entry, {"grid": []})
        table["grid"].append(row)
    for entries in out["benchmarks"].values():
        for entry, table in entries.items():
            best = max(range(len(table["grid"])), key=lambda i: (table["grid"][i]["score"], -i))
            table["strategy"] = split_entry(entry)[0]
            table["chosen"] = table["grid"][best]["values"]
            table["score"] = table["grid"][best]["score"]
    return out


def _value_text(key: str, value: Any) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"


def _values_text(values: dict[str, dict[str, Any]]) -> str:
    return ", ".join(_value_text(k, v) for s in SECTIONS for k, v in values[s].items()) or "(no grid)"


def selection_markdown(selection: dict[str, Any]) -> str:
    """The selection's own leaderboard: every grid point's validation score, the winners marked."""
    lines = [
        "<!-- generated by `bench select`: edit the selection sweep, not this file -->",
        "# Hyperparameter selection",
        "",
        f"From `{selection['source']}`. Rule: {selection['rule_text']}.",
        "The winners are in `selected.json`, which the main job's sweep file reads (`selected:`).",
    ]
    for bench, entries in selection["benchmarks"].items():
        lines += ["", f"## {bench}", "", "| Entry | Grid point | Validation acc. (%) | Seeds | Chosen |"]
        lines.append("|:---|:---|---:|---:|:---:|")
        for entry, table in entries.items():
            for row in table["grid"]:
                mark = "**✓**" if row["values"] == table["chosen"] else ""
                text = _values_text(row["values"])
                lines.append(f"| {entry} | {text} | {100 * row['score']:.1f} | {row['n_seeds']} | {mark} |")
    return "\n".join(lines) + "\n"


def write_selection(sweep, out: str | Path | None = None) -> list[Path]:
    """``bench select``: choose the winners and write ``selected.json`` and ``README.md`` into ``out``."""
    from clcompose.bench.io import ensure_writable_folder

    block = check_select(sweep.data, str(sweep.path)) or {}
    folder = ensure_writable_folder(Path(out or block.get("out", "results/selection")), "--out")
    selection = choose(sweep)
    written = [write_json_atomic(folder / "selected.json", selection, overwrite=True)]
    page = folder / "README.md"
    write_text_atomic(page, selection_markdown(selection))
    return [*written, page]


def tuning_lines(data: dict[str, Any], entries: Sequence[str], where: str) -> list[str]:
    """Per strategy entry of a final sweep, how its hyperparameters were chosen (for the leaderboard page)."""
    selected = data.get("selected")
    winners = load_selected(selected, where) if selected is not None else None
    lines = []
    for bench in data.get("benchmarks") or {}:
        for entry in entries:
            own = (data.get("strategies") or {}).get(entry) or {}
            source = own.get("selected_from")
            won = winner_for(winners, bench, source or entry, strict=source is not None, where=where)
            if won is None:
                lines.append(f"- `{entry}` ({bench}): set by hand in the sweep file")
            else:
                fixed = {k: v for k, v in own.items() if k not in ("train", "selected_from")}
                fixed |= dict(own.get("train") or {})
                origin = f" (the winner of `{source}`)" if source else ""
                # a value the entry states wins over the selection's: say so, and list it only once
                chosen = {k: v for section in SECTIONS for k, v in won[section].items()}
                kept = {section: {k: v for k, v in won[section].items() if k not in fixed} for section in SECTIONS}
                if any(kept.values()):
                    text = f"- `{entry}` ({bench}): selected on validation data{origin}: {_values_text(kept)}"
                else:
                    text = f"- `{entry}` ({bench}): nothing taken from the selection{origin}"
                stated = [
                    _value_text(k, v) + (f" (over the selected {_value_text(k, chosen[k])})" if k in chosen else "")
                    for k, v in fixed.items()
                ]
                lines.append(text + (f"; fixed by the sweep file: {', '.join(stated)}" if stated else ""))
    return lines
