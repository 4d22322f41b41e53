"""What composing costs: the task-vector network's forward against a plain network holding the same weights.

On the main job's backbone (:func:`~clcompose.bench.perf.strategies.main_job`) with T task vectors of each tuning
style (LoRA of the pool's default rank, IA3, full deltas; small random values, so that every τ_t ≠ 0) and one head
per task, side by side in one process and interleaved over ``rounds`` (medians):

- **evaluation**: the composed forward of one evaluation batch — θ0 + Σ_t c_t τ_t (c_t = 1/T) materialised once
  per evaluation, cached, and run through ``functional_call`` (:class:`~clcompose.strategies.task_vectors.
  composable.ComposableNet` in eval mode) — against a plain copy of the backbone whose targeted weights hold the
  same composed values, with the same heads; the materialisation itself, which an evaluation pays once whatever
  its number of batches, in units of one batch's plain forward; and the largest difference of the two logits
  (0.0: the same function);
- **training**: one training step (forward, cross-entropy, backward) of the network as ITA trains it (θ0 + τ_T,
  gradients for τ_T's parameters and the current head) against naive fine-tuning's step on the plain copy (every
  weight trainable).

A measurement, never a test of speed.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any

STYLES = ("lora", "ia3", "full")


def _network(backbone: str, options: dict, style: str, tasks: int, seed: int = 0):
    """A ComposableNet over a fresh ``backbone`` with ``tasks`` non-zero task vectors and two classes per head,
    and a plain deep copy of the backbone (all weights trainable)."""
    import torch

    from clcompose.bench.models.backbones import build_backbone
    from clcompose.strategies.task_vectors.composable import ComposableNet

    torch.manual_seed(seed)
    module = build_backbone(backbone, options)
    net = ComposableNet(module, module.out_features, style=style)
    for t in range(tasks):
        net.pool.add_task()
        with torch.no_grad():
            for p in net.pool.task_parameters(t):
                p.add_(torch.randn_like(p), alpha=1e-3)  # LoRA starts at B = 0: τ = 0 would be no test
        if t < tasks - 1:
            net.pool.freeze(t)
        net.heads.add_head([2 * t, 2 * t + 1])
    plain = copy.deepcopy(net.backbone)
    for p in plain.parameters():
        p.requires_grad_(True)
    return net, plain


def measure_one(
    backbone: str,
    options: dict,
    style: str,
    tasks: int,
    rounds: int,
    eval_batch: int,
    train_batch: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """The row of one (style, T): medians over ``rounds`` interleaved rounds (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    net, plain = _network(backbone, options, style, tasks)
    net.to(device)
    plain.to(device)
    heads = net.heads
    gen = torch.Generator().manual_seed(1)
    x_eval = torch.rand(eval_batch, 1, 28, 28, generator=gen).to(device)
    x_train = torch.rand(train_batch, 1, 28, 28, generator=gen).to(device)
    y_train = torch.randint(0, 2 * tasks, (train_batch,), generator=gen).to(device)

    net.eval()
    with torch.no_grad():
        composed = net.backbone_weights()
        params = dict(plain.named_parameters())
        for name, value in composed.items():
            params[name].copy_(value)
        plain.eval()
        max_abs_diff = float((net(x_eval) - heads(plain(x_eval))).abs().max())

    def materialise():
        net.invalidate()
        net.backbone_weights()

    @torch.no_grad()
    def composed_forward():
        net(x_eval)

    @torch.no_grad()
    def plain_forward():
        heads(plain(x_eval))

    def composed_step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x_train), y_train).backward()

    def plain_step():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(heads(plain(x_train)), y_train).backward()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    plain_forward(), composed_forward()  # warm-up
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        net.eval()
        plain.eval()
        times.setdefault("materialise", []).append(timed(materialise))
        pair = [("eval_composed", composed_forward), ("eval_plain", plain_forward)]
        for key, fn in pair if r % 2 == 0 else pair[::-1]:  # alternate the order: drift hits both alike
            times.setdefault(key, []).append(timed(fn))
        net.train()
        plain.train()
        pair = [("train_composed", composed_step), ("train_plain", plain_step)]
        for key, fn in pair if r % 2 == 0 else pair[::-1]:
            times.setdefault(key, []).append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    eval_ratio = statistics.median(a / b for a, b in zip(times["eval_composed"], times["eval_plain"]))
    train_ratio = statistics.median(a / b for a, b in zip(times["train_composed"], times["train_plain"]))
    return {
        "style": style,
        "tasks": tasks,
        "trainable_per_task": net.pool.trainable_count(tasks - 1),
        "eval_composed_s": round(med["eval_composed"], 5),
        "eval_plain_s": round(med["eval_plain"], 5),
        "eval_overhead": round(eval_ratio - 1, 4),  # median of the rounds' composed/plain − 1
        "materialise_s": round(med["materialise"], 5),
        "materialise_vs_forward": round(med["materialise"] / med["eval_plain"], 4),
        "max_abs_logit_diff": max_abs_diff,
        "train_composed_s": round(med["train_composed"], 5),
        "train_plain_s": round(med["train_plain"], 5),
        "train_ratio": round(train_ratio, 4),
    }


def measure(
    styles: list[str] | tuple[str, ...] = STYLES,
    tasks: list[int] | tuple[int, ...] = (1, 5, 20),
    rounds: int = 5,
    eval_batch: int = 256,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Rows for every (style, T) on the main job's backbone, with its training batch size."""
    import torch

    from clcompose.bench.perf.strategies import main_job

    job = main_job()
    options = dict(job["backbone_options"])
    train_batch = int(job["train"].get("batch_size", 32))
    rows = []
    for style in styles:
        for t in tasks:
            row = measure_one(job["backbone"], options, style, t, rounds, eval_batch, train_batch, device)
            rows.append(row)
            if progress:
                print(
                    f"  {style} T={t}: eval overhead {row['eval_overhead']:+.3f}, training step "
                    f"× {row['train_ratio']:.2f}",
                    file=sys.stderr,
                )
    return {
        "backbone": job["backbone"],
        "backbone_options": options,
        "eval_batch": eval_batch,
        "train_batch": train_batch,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "device": device,
        "rows": rows,
        "max_eval_overhead": max(r["eval_overhead"] for r in rows),
    }
