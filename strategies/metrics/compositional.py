"""Compositional-generalisation metrics as pure functions (Schug et al. 2024; the suite's teacher streams).

Accuracy is argmax agreement with the soft target's argmax; the loss is KL(target ‖ softmax(student)).
Forgetting over an accuracy matrix is :func:`bench.metrics.forgetting`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def agreement_accuracy(logits: torch.Tensor, soft_targets: torch.Tensor) -> float:
    """Mean of 1[argmax logits = argmax target] over all points (any leading shape)."""
    return float((logits.argmax(-1) == soft_targets.argmax(-1)).float().mean())


def soft_kl(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) = Σ_c p_c (log p_c − log softmax(logits)_c), averaged over points (differentiable)."""
    logp = torch.log_softmax(logits, dim=-1)
    return (soft_targets * (soft_targets.clamp_min(1e-12).log() - logp)).sum(-1).mean()


def compositional_gap(in_distribution: float, out_of_distribution: float) -> float:
    """CompGap = accuracy on trained combinations − accuracy on held-out combinations (same adaptation)."""
    return float(in_distribution - out_of_distribution)


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def decoding_r2_per_target(train_features, train_z, test_features, test_z, l2: float = 1.0) -> np.ndarray:
    """R² of each target column of ``test_z`` predicted by a ridge regression (penalty ``l2``, with intercept)
    fitted from standardised ``train_features`` to ``train_z`` (features standardised with the train statistics).

    R² = 1 − Σ (z − ẑ)² / Σ (z − z̄)² per column; NaN where the test column is constant (undefined).
    """
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    xtr, xte = _standardise(np.asarray(train_features, float), np.asarray(test_features, float))
    ytr = np.asarray(train_z, float).reshape(len(xtr), -1)
    yte = np.asarray(test_z, float).reshape(len(xte), -1)
    pred = Ridge(alpha=l2, fit_intercept=True).fit(xtr, ytr).predict(xte).reshape(yte.shape)
    out = np.full(yte.shape[1], np.nan)
    for j in range(yte.shape[1]):
        if yte[:, j].var() > 1e-12:
            out[j] = r2_score(yte[:, j], pred[:, j])
    return out


def decoding_r2(train_features, train_z, test_features, test_z, l2: float = 1.0) -> float:
    """Module decodability: mean over the defined target columns of :func:`decoding_r2_per_target`."""
    per = decoding_r2_per_target(train_features, train_z, test_features, test_z, l2)
    if np.isnan(per).all():
        return float("nan")
    return float(np.nanmean(per))


def composition_gain(merged: Sequence[float], singles: Sequence[Sequence[float]]) -> float:
    """Mean over pairs of acc(merged a+b on pair) − max(acc(a alone on pair), acc(b alone on pair))."""
    merged = np.asarray(merged, float)
    best = np.asarray([max(s) for s in singles], float)
    if merged.shape != best.shape or merged.size == 0:
        raise ValueError(f"need one merged accuracy per pair, got {merged.shape} and {best.shape}")
    return float((merged - best).mean())
