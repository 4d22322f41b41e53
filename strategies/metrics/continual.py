"""Continual-learning metrics as pure functions of the accuracy matrix.

``acc[i][j]`` is the test accuracy on experience ``j`` measured right after training on experience ``i``
(rows: training step, columns: evaluated experience), for a stream of ``T`` experiences. Definitions follow
Lopez-Paz & Ranzato (2017) and Chaudhry et al. (2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _square(acc: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError("accuracy matrix contains NaN")
    return a


def average_accuracy(acc: Sequence[Sequence[float]], step: int = -1) -> float:
    """A_k = (1/(k+1)) Σ_{j≤k} acc[k][j]: mean accuracy over the experiences seen after step k (default: last)."""
    a = _square(acc)
    k = step % a.shape[0]
    return float(a[k, : k + 1].mean())


def accuracy_curve(acc: Sequence[Sequence[float]]) -> list[float]:
    """[A_0, …, A_{T-1}]: average accuracy on seen experiences after each training step."""
    a = _square(acc)
    return [average_accuracy(a, k) for k in range(a.shape[0])]


def forgetting(acc: Sequence[Sequence[float]]) -> float:
    """F = (1/(T-1)) Σ_{j<T-1} max_{i<T-1, i≥j} acc[i][j] − acc[T-1][j]  (0 for a single experience)."""
    a = _square(acc)
    t = a.shape[0]
    if t == 1:
        return 0.0
    per_exp = [a[j : t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]
    return float(np.mean(per_exp))


def backward_transfer(acc: Sequence[Sequence[float]]) -> float:
    """BWT = (1/(T-1)) Σ_{j<T-1} (acc[T-1][j] − acc[j][j])  (0 for a single experience); negative = forgetting."""
    a = _square(acc)
    t = a.shape[0]
    if t == 1:
        return 0.0
    return float(np.mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


def summarize(acc: Sequence[Sequence[float]]) -> dict[str, float | list[float]]:
    """All scalar metrics of one run, keyed as they appear in a result record."""
    return {
        "final_average_accuracy": average_accuracy(acc),
        "forgetting": forgetting(acc),
        "bwt": backward_transfer(acc),
        "accuracy_curve": accuracy_curve(acc),
    }
