"""What the diagonal true Fisher costs, per example, against one batched forward + backward per label.

    python -m clcompose.bench.perf.fisher [--backbone efficientnet-lite0 --examples 64,128,256,512 --repeats 3]

On the backbone the main job uses (θ0, BatchNorm in eval mode) with a head over ``classes`` classes, times side by
side in one process, interleaved over ``repeats`` rounds: the per-example ``torch.func.vmap`` estimator
(:func:`~clcompose.strategies.core.fisher.fisher_sum`), the batched hook estimator
(:func:`~clcompose.strategies.core.per_example.layer_fisher_sum`), and the floor — one batched forward and backward
of the same examples per label — for the exact (one label per class) and sampled (one drawn label) estimators,
at several numbers of examples. Reports medians and their ratios; a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _setup(backbone_name: str, classes: int, image_size: int, options: dict | None = None):
    import torch.nn.functional as F
    from torch import nn

    from clcompose.bench.models.backbones import build_backbone

    if options is None:
        options = {"image_size": image_size} if backbone_name == "efficientnet-lite0" else {}
    backbone = build_backbone(backbone_name, options)
    model = nn.Sequential(backbone, nn.Linear(backbone.out_features, classes)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "1"}

    def batch_log_prob(x):
        return F.log_softmax(model(x), dim=-1)

    return model, modules, batch_log_prob


def _timed(fn, *args, **kwargs) -> float:
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def measure(
    backbone: str,
    classes: int,
    examples: list[int],
    repeats: int,
    image_size: int,
    batch: int,
    vmap: bool = True,
    modes: tuple[str, ...] = ("exact", "sampled"),
    device: str = "cpu",
    progress: bool = True,
    backbone_options: dict | None = None,
) -> dict:
    """Medians over ``repeats`` of the batched estimator, the floor and (``vmap``) the vmap estimator per number
    of examples and mode (``exact``: one label per class, ``sampled``: one drawn label), on ``device``."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from clcompose.strategies.core.fisher import fisher_sum
    from clcompose.strategies.core.per_example import layer_fisher_sum

    torch.manual_seed(0)
    model, modules, batch_log_prob = _setup(backbone, classes, image_size, backbone_options)
    model.to(device)
    params = {n: m.weight for n, m in modules.items()}

    def one(weights, xi):
        return F.log_softmax(functional_call(model, dict(weights), (xi.unsqueeze(0),), strict=False)[0], dim=-1)

    def floor(x, labels: int):
        """One batched forward, then per label one backward of a batch loss into the targeted weights."""
        weights = [m.weight for m in modules.values()]
        for w in weights:
            w.requires_grad_(True)
        for xb in torch.split(x, batch):
            logp = batch_log_prob(xb)
            for j in range(labels):
                torch.autograd.grad(logp[:, j % classes].sum(), weights, retain_graph=j < labels - 1)
        for w in weights:
            w.requires_grad_(False)

    rows = []
    for n in examples:
        x = torch.rand(n, 1, 28, 28, device=device)
        times: dict[str, list[float]] = {}
        for _ in range(repeats):
            for mode, labels in (("exact", classes), ("sampled", 1)):
                if mode not in modes:
                    continue
                batches = torch.split(x, batch)
                if vmap:
                    times.setdefault(f"vmap_{mode}", []).append(
                        _timed(
                            fisher_sum,
                            one,
                            params,
                            batches,
                            mode=mode,
                            chunk=32,
                            generator=torch.Generator().manual_seed(0),
                        )
                    )
                batched_s = _timed(
                    layer_fisher_sum,
                    batch_log_prob,
                    modules,
                    batches,
                    mode=mode,
                    generator=torch.Generator().manual_seed(0),
                )
                times.setdefault(f"batched_{mode}", []).append(batched_s)
                times.setdefault(f"floor_{mode}", []).append(_timed(floor, x, labels))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"examples": n, **{f"{k}_s": round(v, 4) for k, v in med.items()}}
        for mode in modes:
            row[f"batched_vs_floor_{mode}"] = round(med[f"batched_{mode}"] / med[f"floor_{mode}"], 3)
            if vmap:
                row[f"vmap_vs_floor_{mode}"] = round(med[f"vmap_{mode}"] / med[f"floor_{mode}"], 3)
                row[f"vmap_vs_batched_{mode}"] = round(med[f"vmap_{mode}"] / med[f"batched_{mode}"], 2)
            row[f"batched_per_example_ms_{mode}"] = round(1000 * med[f"batched_{mode}"] / n, 3)
        rows.append(row)
        if progress:
            print(f"  {n:5d} examples: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()), file=sys.stderr)
    return {
        "backbone": backbone,
        "image_size": image_size,
        "classes": classes,
        "batch": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "device": device,
        "targeted_weights": len(modules),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m clcompose.bench.perf.fisher", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10, help="classes in the head (the exact Fisher's labels)")
    p.add_argument("--examples", default="64,128,256,512")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the measurements as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples = [int(v) for v in args.examples.split(",")]
    result = measure(args.backbone, args.classes, examples, args.repeats, args.image_size, args.batch)
    print(json.dumps(result["rows"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
