"""Editing skills over a pool of task vectors: unlearning and specialisation.

Both are re-weightings of a composition θ0 + Σ_s c_s τ_s (after ITA/IEL training c_s = 1/T; after task
arithmetic c_s = λ), and keep the total mass S = Σ_s c_s where that makes sense:

- **unlearning** of experience k: ``drop`` sets c_k = 0, ``negate`` sets c_k = −c_k;
- **specialisation** toward k: c_k = w S and c_s = (1 − w) S/(T − 1) for s ≠ k (for uniform c, w = 1/T is the
  unedited model and w = 1 is θ0 + τ_k alone).

The **head-only control** applies the same edit c → c' to the heads instead of the task vectors: the backbone
stays at the composition θ0 + Σ_s c_s τ_s and head s's weights and bias are scaled by r_s = c'_s / c_s, i.e. its
logits W_s φ + b_s become r_s (W_s φ + b_s); a head with r_s = 0 is removed (its classes' logits set to the mask
value, so they can never be predicted). Drop then masks the target's head, negate flips the sign of its logits,
and specialisation with w = 1 masks every other head.

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


def head_scales(coefficients: Sequence[float], edited: Sequence[float]) -> list[float]:
    """The head-only control of an edit c → c': head s is scaled by r_s = c'_s / c_s (r_s = 0: head removed);
    an unedited coefficient (c'_s = c_s, also 0) leaves its head as it is."""
    if len(coefficients) != len(edited):
        raise ValueError(f"{len(edited)} edited coefficients for {len(coefficients)} task vectors")
    scales = []
    for s, (c, e) in enumerate(zip(coefficients, edited)):
        if c == 0 and e != 0:
            raise ValueError(f"experience {s} has coefficient 0 in the composition; its head cannot be re-weighted")
        scales.append(1.0 if c == e else e / c)
    return scales


def edit_head_logits(logits: torch.Tensor, head_classes: Sequence[Sequence[int]], scales: Sequence[float]):
    """Logits of heads scaled by ``scales``: column j of head s becomes r_s z_j, or the mask value where r_s = 0
    (scaling a linear head's weights and bias by r_s scales its logits by r_s). Other columns are unchanged."""
    from clcompose.strategies.core.heads import MASK_VALUE

    if len(scales) != len(head_classes):
        raise ValueError(f"{len(scales)} scales for {len(head_classes)} heads")
    out = logits.clone()
    for classes, r in zip(head_classes, scales):
        cols = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
        out[:, cols] = MASK_VALUE if r == 0 else logits[:, cols] * r
    return out


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
def composed_logits(
    model, coefficients: Sequence[float] | None, experiences: Iterable[tuple[int, torch.Tensor, torch.Tensor]]
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(experience, logits, labels) per batch of the model composed with ``coefficients`` (None: its own)."""
    model.eval()
    old = model.coefficients
    model.coefficients = list(coefficients) if coefficients is not None else None
    model.invalidate()
    try:
        return [(exp, model(x), y) for exp, x, y in experiences]
    finally:
        model.coefficients = old
        model.invalidate()


def class_il_accuracy(
    scored: Iterable[tuple[int, torch.Tensor, torch.Tensor]], target: int, target_classes: Sequence[int]
) -> dict:
    """Class-IL accuracy (argmax over every column) on experience ``target`` and on the rest, plus the target's
    accuracy restricted to its own classes (task-aware); None where there is no example."""
    from clcompose.strategies.core.heads import mask_to_classes

    hits = {"acc_target": [0, 0], "acc_rest": [0, 0], "acc_target_own_classes": [0, 0]}
    for exp, logits, y in scored:
        key = "acc_target" if exp == target else "acc_rest"
        hits[key][0] += int((logits.argmax(1) == y).sum())
        hits[key][1] += len(y)
        if exp == target:
            hits["acc_target_own_classes"][0] += int((mask_to_classes(logits, target_classes).argmax(1) == y).sum())
            hits["acc_target_own_classes"][1] += len(y)
    return {k: (v[0] / v[1] if v[1] else None) for k, v in hits.items()}


def edit_accuracy(
    model,
    coefficients: Sequence[float] | None,
    experiences: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
    target: int,
) -> dict:
    """Class-IL accuracy of the model composed with ``coefficients`` on the target experience and on the rest,
    plus the target's accuracy restricted to its own classes (task-aware)."""
    scored = composed_logits(model, coefficients, experiences)
    return class_il_accuracy(scored, target, model.heads.head_classes[target])
