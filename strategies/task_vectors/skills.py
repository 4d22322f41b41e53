"""Editing skills over a pool of task vectors: unlearning and specialisation.

Both are re-weightings of a composition θ0 + Σ_s c_s τ_s (after ITA/IEL training c_s = 1/T; after task
arithmetic c_s = λ), and keep the total mass S = Σ_s c_s where that makes sense:

- **unlearning** of experience k: ``drop`` sets c_k = 0, ``negate`` sets c_k = −c_k;
- **specialisation** toward k: c_k = w S and c_s = (1 − w) S/(T − 1) for s ≠ k (for uniform c, w = 1/T is the
  unedited model and w = 1 is θ0 + τ_k alone).

Task vectors and heads are saved as safetensors with a JSON header describing the pool.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


def _check_target(coefficients: Sequence[float], target: int) -> None:
    if not 0 <= target < len(coefficients):
        raise ValueError(f"experience {target} is not in the pool (0..{len(coefficients) - 1})")


def unlearn_coefficients(coefficients: Sequence[float], target: int, mode: str = "drop") -> list[float]:
    """Remove (``drop``: c_k = 0) or subtract (``negate``: c_k = −c_k) experience ``target``'s task vector."""
    _check_target(coefficients, target)
    c = list(coefficients)
    if mode == "drop":
        c[target] = 0.0
    elif mode == "negate":
        c[target] = -c[target]
    else:
        raise ValueError(f"unknown unlearning mode {mode!r}; valid: drop, negate")
    return c


def specialize_coefficients(coefficients: Sequence[float], target: int, weight: float = 1.0) -> list[float]:
    """Move the composition's mass toward ``target``: c_k = w S, the others share (1 − w) S."""
    _check_target(coefficients, target)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"specialisation weight must be in [0, 1], got {weight}")
    total, t = float(sum(coefficients)), len(coefficients)
    if t == 1:
        return [total]
    rest = (1.0 - weight) * total / (t - 1)
    return [weight * total if s == target else rest for s in range(t)]


def save_task_vectors(model, path: Path, method: str = "") -> Path:
    """Write every task vector's parameters and every head of a ComposableNet to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    pool, heads = model.pool, model.heads
    tensors = {}
    for t, mods in enumerate(pool.vectors):
        for i, mod in enumerate(mods):
            for pname, p in mod.named_parameters():
                tensors[f"task{t}.{i}.{pname}"] = p.detach().cpu().contiguous()
    for t, head in enumerate(heads.heads):
        tensors[f"head{t}.weight"] = head.weight.detach().cpu().contiguous()
        tensors[f"head{t}.bias"] = head.bias.detach().cpu().contiguous()
    meta = {
        "method": method,
        "style": pool.style,
        "rank": str(pool.rank),
        "qkv_rank_multiplier": str(pool.qkv_rank_multiplier),
        "names": json.dumps(pool.names),
        "head_classes": json.dumps(heads.head_classes),
        "num_tasks": str(pool.num_tasks),
        "coefficients": json.dumps(model.coefficients),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_task_vectors(model, path: Path) -> dict:
    """Fill an empty ComposableNet (same backbone and tuning style) with the saved tasks and heads."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pool, heads = model.pool, model.heads
    if meta["style"] != pool.style or json.loads(meta["names"]) != pool.names:
        raise ValueError(f"{path} holds {meta['style']} task vectors for other layers than this model's")
    pool.qkv_rank_multiplier = int(meta.get("qkv_rank_multiplier", 1))  # the saved ranks, whatever the caller built
    for t, classes in enumerate(json.loads(meta["head_classes"])):
        pool.add_task()
        for i, mod in enumerate(pool.vectors[t]):
            for pname, p in mod.named_parameters():
                p.data.copy_(tensors[f"task{t}.{i}.{pname}"])
        pool.freeze(t)
        head = heads.add_head(classes)
        head.weight.data.copy_(tensors[f"head{t}.weight"])
        head.bias.data.copy_(tensors[f"head{t}.bias"])
        head.requires_grad_(False)
    coeffs = json.loads(meta.get("coefficients", "null"))
    model.coefficients = coeffs
    model.invalidate()
    return meta


@torch.no_grad()
def edit_accuracy(
    model,
    coefficients: Sequence[float] | None,
    experiences: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    target: int,
) -> dict:
    """Class-IL accuracy of the model composed with ``coefficients`` on the target experience and on the rest,
    plus the target's accuracy restricted to its own classes (task-aware)."""
    from clcompose.strategies.core.heads import mask_to_classes

    model.eval()
    old = model.coefficients
    model.coefficients = list(coefficients) if coefficients is not None else None
    model.invalidate()
    hits = {"acc_target": [0, 0], "acc_rest": [0, 0], "acc_target_own_classes": [0, 0]}
    target_classes = model.heads.head_classes[target]
    for exp, x, y in experiences:
        logits = model(x)
        key = "acc_target" if exp == target else "acc_rest"
        hits[key][0] += int((logits.argmax(1) == y).sum())
        hits[key][1] += len(y)
        if exp == target:
            hits["acc_target_own_classes"][0] += int((mask_to_classes(logits, target_classes).argmax(1) == y).sum())
            hits["acc_target_own_classes"][1] += len(y)
    model.coefficients = old
    model.invalidate()
    return {k: (v[0] / v[1] if v[1] else None) for k, v in hits.items()}
