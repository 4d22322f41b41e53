"""Composition rules for task vectors, as pure functions of per-task weight deltas.

Every rule maps T task vectors τ_t (each a ``{weight name: ΔW}`` mapping of effective deltas, e.g. B_t A_t for
LoRA) to one merged delta τ_m; the composed network is θ0 + λ τ_m.

- :func:`weighted_sum` — Σ_t c_t τ_t (task arithmetic's sum with c_t = λ, ITA/IEL's average with c_t = 1/T);
- :func:`ties_merge` — TIES-Merging (Yadav et al., NeurIPS 2023): *trim* each τ_t to its ``density`` fraction of
  largest magnitudes (over the whole task vector), *elect* per coordinate the sign of Σ_t τ̂_t, and take the
  *disjoint mean* over the tasks whose trimmed entry is non-zero and agrees with that sign;
- :func:`magmax_merge` — MagMax (Marczak et al., ECCV 2024): per coordinate the entry of largest magnitude over the
  task vectors (ties: the earliest task);
- :func:`fisher_merge` — Fisher merging (Matena & Raffel, NeurIPS 2022) of θ_t = θ0 + τ_t with diagonal Fishers F_t:
  θ = Σ_t F_t θ_t / Σ_t F_t, i.e. τ_m = Σ_t F_t τ_t / Σ_t F_t (ε added to every F_t so that coordinates no task
  informs get the plain mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Vector = Mapping[str, torch.Tensor]


def _names(vectors: Sequence[Vector]) -> list[str]:
    if not vectors:
        raise ValueError("no task vectors to merge")
    names = list(vectors[0])
    if any(list(v) != names for v in vectors[1:]):
        raise ValueError("task vectors must cover the same weights")
    return names


def weighted_sum(vectors: Sequence[Vector], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_t c_t τ_t; tasks with c_t = 0 contribute exactly nothing."""
    names = _names(vectors)
    if len(coefficients) != len(vectors):
        raise ValueError(f"{len(coefficients)} coefficients for {len(vectors)} task vectors")
    out = {n: torch.zeros_like(vectors[0][n]) for n in names}
    for v, c in zip(vectors, coefficients):
        if c != 0:
            for n in names:
                out[n] = out[n] + c * v[n]
    return out


def trim(vector: Vector, density: float) -> dict[str, torch.Tensor]:
    """Keep the ``density`` fraction of the task vector's entries with the largest magnitude (over all its weights;
    at least one entry), zero the rest."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = torch.cat([t.reshape(-1).abs() for t in vector.values()])
    keep = max(1, int(round(density * flat.numel())))
    threshold = torch.topk(flat, keep, largest=True, sorted=True).values[-1]
    return {n: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for n, t in vector.items()}


def ties_merge(vectors: Sequence[Vector], density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES-Merging: trim, elect sign, disjoint mean (see the module docstring)."""
    names = _names(vectors)
    trimmed = [trim(v, density) for v in vectors]
    out = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])  # (T, ...)
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0)
        total = (stack * agree).sum(0)
        out[n] = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return out


def magmax_merge(vectors: Sequence[Vector]) -> dict[str, torch.Tensor]:
    """MagMax: per coordinate, the task-vector entry of largest magnitude (the earliest task on ties)."""
    names = _names(vectors)
    out = {}
    for n in names:
        stack = torch.stack([v[n] for v in vectors])
        pick = stack.abs().argmax(0, keepdim=True)
        out[n] = stack.gather(0, pick)[0]
    return out


def fisher_merge(vectors: Sequence[Vector], fishers: Sequence[Vector], eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Fisher merging: Σ_t (F_t + ε) τ_t / Σ_t (F_t + ε), coordinate-wise."""
    names = _names(vectors)
    if len(fishers) != len(vectors):
        raise ValueError(f"{len(fishers)} Fishers for {len(vectors)} task vectors")
    out = {}
    for n in names:
        weight = torch.stack([f[n] + eps for f in fishers])
        out[n] = (weight * torch.stack([v[n] for v in vectors])).sum(0) / weight.sum(0)
    return out
