"""``--scale smoke``: the same sweep, shrunk so that every cell's code path runs on a CPU in minutes.

The overlay rewrites a parsed sweep file before it is expanded:

- every image benchmark of :mod:`~clcompose.bench.data.paper_benchmarks` reads a tiny generated folder in its
  own layout (:func:`~clcompose.bench.data.fake_folders.write_fake_dataset`: 2 train + 2 test 8 × 8 images per
  class, under ``$BENCH_CACHE/smoke-data/<benchmark>``), at 16 px, in 2 experiences;
- ``vit-b16`` becomes a tiny random ViT (1 block, width 16, 2 heads, 8 px patches; no download, no checkpoint),
  its normalisation kept;
- 1 epoch (an entry's own ``train.epochs`` too), 1 seed, batches of 4, 2 loader workers at most; a virtual
  batch of V > 1 mini-batches becomes 2 (so that accumulation still happens within an epoch of a few
  mini-batches); the reference's pre-tuning and alignment schedules keep their code path with 1 epoch each,
  8 samples per class and 5 EM iterations;
- the sweep is named ``<name>-smoke`` (its own run folders) and runs on the ``local`` profile unless a
  profile is given. Everything else (strategies, their options, precision, checkpoints) stays as it is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from clcompose.strategies.core.registry import ConfigError

SCALES = ("smoke",)
TINY_VIT = {"pretrained": False, "checkpoint": None, "img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2}
TINY_VIT["patch_size"] = 8
TASK_VECTOR_OPTIONS = {
    "probe_epochs": 1,
    "align_epochs": 1,
    "align_epochs_per_task": 0,
    "align_per_class": 8,
    "gmm_iterations": 5,
}


def smoke_data_root(benchmark: str) -> Path:
    from clcompose.bench.io import cache_dir

    return cache_dir() / "smoke-data" / benchmark


def _generated(benchmark: str) -> str:
    from clcompose.bench.data.fake_folders import write_fake_dataset

    root = smoke_data_root(benchmark)
    done = root / ".complete"
    if not done.exists():  # written once per cache; a partial folder (killed writer) is completed again
        write_fake_dataset(benchmark, root, per_class=2, size=8)
        done.write_text("ok\n")
    return str(root)


def apply_scale(data: dict[str, Any], scale: str | None, where: str) -> dict[str, Any]:
    """The sweep mapping ``data`` at ``scale`` (None: unchanged)."""
    if scale is None:
        return data
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    from clcompose.bench.data.fake_folders import LAYOUTS
    from clcompose.strategies.core.registry import STRATEGIES

    out = copy.deepcopy(data)
    out["name"] = f"{data.get('name', Path(where).stem)}-smoke"
    if "output" in out:
        out["output"] = f"{str(out['output']).rstrip('/')}-smoke"
    out["cluster"] = "local"
    out["seeds"] = [0]
    benchmarks = out.get("benchmarks") or {}
    if isinstance(benchmarks, dict):
        for name, opts in benchmarks.items():
            if name in LAYOUTS and (opts is None or isinstance(opts, dict)):
                opts = dict(opts or {})
                opts.update({"data_root": _generated(name), "image_size": 16, "n_experiences": 2})
                opts.pop("per_class", None)
                opts.pop("test_per_class", None)
                benchmarks[name] = opts
    backbones = out.get("backbones") or {}
    if isinstance(backbones, dict) and "vit-b16" in backbones:
        backbones["vit-b16"] = {
            k: v for k, v in (backbones["vit-b16"] or {}).items() if k in ("normalization", "model_name")
        } | TINY_VIT
    train = dict(out.get("train") or {})
    train.update({"epochs": 1, "batch_size": 4, "eval_batch_size": 64, "workers": min(int(train.get("workers", 0)), 2)})
    out["train"] = train
    strategies = out.get("strategies") or {}
    if isinstance(strategies, dict):
        for entry, opts in strategies.items():
            if not isinstance(opts, dict):
                continue
            opts = dict(opts)
            fields = STRATEGIES[entry.split("@")[0]].options.field_names()
            opts.update({k: v for k, v in TASK_VECTOR_OPTIONS.items() if k in fields})
            own_train = dict(opts.get("train") or {})
            if "batch_size" in own_train:
                own_train["batch_size"] = 4
            if "epochs" in own_train:  # an entry's own epochs (e.g. L2P's 5) shrink like the shared ones
                own_train["epochs"] = 1
            if (own_train.get("virtual_batch") or 1) > 1 or opts.get("preset") == "reference":
                own_train["virtual_batch"] = 2
            if own_train:
                opts["train"] = own_train
            strategies[entry] = opts
    return out
