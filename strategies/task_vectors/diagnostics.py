"""Second-order diagnostics of a composed model (pure functions plus their evaluation on a pool).

With τ_P = Σ_t w_t τ_t and a quadratic loss of Hessian H around θ0 (Jensen / the paper's bound):

    Σ_t w_t L(θ0 + τ_t) − L(θ0 + τ_P) = ½ Σ_t w_t ‖τ_t − τ_P‖²_H ≥ 0.

:func:`jensen_gap` measures the left side with the real loss; :func:`fisher_weighted_spread` evaluates the
right side with the diagonal Fisher in place of H.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def jensen_gap(
    individual_losses: Sequence[float], composed_loss: float, weights: Sequence[float] | None = None
) -> float:
    """Σ_t w_t L(θ_t) − L(θ_P) (uniform w by default)."""
    w = [1.0 / len(individual_losses)] * len(individual_losses) if weights is None else list(weights)
    return float(sum(wi * li for wi, li in zip(w, individual_losses)) - composed_loss)


def fisher_weighted_spread(deltas: torch.Tensor, weights: Sequence[float], fisher: torch.Tensor | None = None) -> float:
    """½ Σ_t w_t ‖τ_t − τ_P‖²_F with τ_P = Σ_t w_t τ_t; ``deltas`` is (T, P), ``fisher`` (P,) or None (= identity)."""
    w = torch.as_tensor(list(weights), dtype=deltas.dtype)
    center = (w[:, None] * deltas).sum(0)
    diff2 = (deltas - center).pow(2)
    if fisher is not None:
        diff2 = diff2 * fisher
    return float(0.5 * (w * diff2.sum(1)).sum())


def cosine_matrix(deltas: torch.Tensor) -> list[list[float]]:
    """Pairwise cosine similarity of flattened task vectors (rows of ``deltas``)."""
    normed = F.normalize(deltas, dim=1)
    return (normed @ normed.T).tolist()


@torch.no_grad()
def second_order_diagnostics(model, batches, fisher=None) -> dict:
    """Diagnostics of a :class:`~clcompose.strategies.task_vectors.composable.ComposableNet` on labelled batches ``[(x, y, ...), ...]``.

    Losses are class-incremental cross-entropies over all seen classes (concatenated heads), averaged over
    the examples; the composed model uses the model's current coefficients, the spread uniform weights.
    """
    pool, heads = model.pool, model.heads
    t = pool.num_tasks
    was_training = model.training
    model.eval()
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])

    def loss_at(weights) -> float:
        total = 0.0
        for i in range(0, len(ys), 256):
            total += float(
                F.cross_entropy(heads(pool.forward_with(weights, xs[i : i + 256])), ys[i : i + 256], reduction="sum")
            )
        return total / len(ys)

    composed = loss_at(pool.weights(model.composed_coefficients()))
    individual = [loss_at(model.individual_weights(s)) for s in range(t)]
    deltas = torch.stack([pool.flat_delta(s) for s in range(t)])
    f = pool.flat_fisher(fisher.upto(t - 1)) if fisher is not None and len(fisher.counts) >= t else None
    uniform = [1.0 / t] * t
    model.train(was_training)
    return {
        "examples": int(len(ys)),
        "composed_loss": composed,
        "individual_losses": individual,
        "jensen_gap": jensen_gap(individual, composed),
        "fisher_spread": fisher_weighted_spread(deltas, uniform, f) if f is not None else None,
        "euclidean_spread": fisher_weighted_spread(deltas, uniform, None),
        "tau_norm": deltas.norm(dim=1).tolist(),
        "cosine": cosine_matrix(deltas),
    }
