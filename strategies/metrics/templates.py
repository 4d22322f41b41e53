"""Measurements of template-mixture programs, as pure functions of mixture logits ξ (L × N) or counts.

- :func:`mixture_entropy`: per-layer entropy H(p_ℓ) = −Σ_k p_ℓk log p_ℓk of p_ℓ = softmax(ξ_ℓ), in nats or
  normalised by log N (1 = uniform mixture, 0 = one template: a "program" in the paper's sense).
  Self-organisation shows as entropy falling with training.
- :func:`program_overlap`: how much two tasks run the same computation, (1/L) Σ_ℓ Σ_k min(p_ℓk, q_ℓk)
  (per-layer histogram intersection: 1 = identical mixtures, 0 = disjoint templates at every depth).
- :func:`template_usage_overlap`: the same on the depth-averaged usage ū = (1/L) Σ_ℓ p_ℓ (which templates a
  task uses, wherever it uses them).
- :func:`template_usage_jsd`: Jensen–Shannon divergence (base 2, in [0, 1]) between two tasks' depth-averaged
  usages (0 = the same templates, 1 = disjoint ones).
- :func:`overlap_matrix`: pairwise overlaps (or divergences) of a list of programs.
- :func:`ladder_holds`: the expected transfer ordering head only < ξ + head ≤ full fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _probabilities(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"mixture logits must be an L × N matrix, got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mixture_entropy(logits, normalized: bool = True) -> list[float]:
    """Entropy of softmax(ξ_ℓ) for every layer ℓ; divided by log N when ``normalized`` (N = 1 gives 0)."""
    p = _probabilities(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    n = p.shape[1]
    if normalized:
        h = h / math.log(n) if n > 1 else np.zeros_like(h)
    return [float(v) for v in h]


def program_overlap(logits_a, logits_b) -> float:
    """(1/L) Σ_ℓ Σ_k min(p_ℓk, q_ℓk) for p = softmax(ξ_a), q = softmax(ξ_b) (same shape)."""
    p, q = _probabilities(logits_a), _probabilities(logits_b)
    if p.shape != q.shape:
        raise ValueError(f"programs of different shapes {p.shape} and {q.shape}")
    return float(np.minimum(p, q).sum(axis=1).mean())


def template_usage_overlap(logits_a, logits_b) -> float:
    """Σ_k min(ū_k, v̄_k) with ū = mean over layers of softmax(ξ_a) (which templates, wherever used)."""
    p, q = _probabilities(logits_a), _probabilities(logits_b)
    if p.shape != q.shape:
        raise ValueError(f"programs of different shapes {p.shape} and {q.shape}")
    return float(np.minimum(p.mean(axis=0), q.mean(axis=0)).sum())


def template_usage_jsd(logits_a, logits_b) -> float:
    """JSD(ū ‖ v̄) = ½ KL(ū ‖ m) + ½ KL(v̄ ‖ m), m = (ū + v̄)/2, in bits, of the depth-averaged usages."""
    p, q = _probabilities(logits_a), _probabilities(logits_b)
    if p.shape != q.shape:
        raise ValueError(f"programs of different shapes {p.shape} and {q.shape}")
    u, v = p.mean(axis=0), q.mean(axis=0)
    m = (u + v) / 2

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.where(a > 0, a * np.log2(a / b), 0.0).sum())

    return max(0.0, 0.5 * kl(u, m) + 0.5 * kl(v, m))


def overlap_matrix(programs: Sequence, kind: str = "program") -> list[list[float]]:
    """Pairwise :func:`program_overlap` (``kind="program"``), :func:`template_usage_overlap` (``"usage"``) or
    :func:`template_usage_jsd` (``"jsd"``)."""
    fn = {"program": program_overlap, "usage": template_usage_overlap, "jsd": template_usage_jsd}[kind]
    return [[fn(a, b) for b in programs] for a in programs]


def mean_offdiagonal(matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean of the entries off the diagonal (None for fewer than two rows)."""
    m = np.asarray(matrix, dtype=float)
    if m.shape[0] < 2:
        return None
    return float(m[~np.eye(m.shape[0], dtype=bool)].mean())


def parameters_per_task(program_shape: Sequence[int] | None, feature_dim: int, n_classes: int) -> int:
    """Parameters that a new task adds: its program (L·N logits, none for fixed programs) and its linear head."""
    program = int(np.prod(program_shape)) if program_shape is not None else 0
    return program + feature_dim * n_classes + n_classes


def ladder_holds(head: float, program: float | None, full: float, margin: float = 0.0) -> bool:
    """head only < ξ + head ≤ full fine-tuning (+ ``margin`` of slack on the second inequality)."""
    if program is None:
        return False
    return head < program <= full + margin
