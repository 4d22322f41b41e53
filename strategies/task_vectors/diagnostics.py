"""Second-order diagnostics of a composed model (pure functions plus their evaluation on a pool).

**Weighted rules** (``average``, ``sum``, ``tangent``): the composed point is θ_P = θ0 + τ_P, τ_P = Σ_t w_t τ_t,
with the composition's own weights w_t (1/T for ``average``, λ for task arithmetic's ``sum``). Writing it as
the affine combination of θ0 (weight w_0 = 1 − Σ_t w_t, τ_0 = 0) and the θ0 + τ_t, a quadratic loss of Hessian H
gives the identity (Jensen's gap when every weight is ≥ 0, e.g. the average, where w_0 = 0)

    Σ_{t≥0} w_t L(θ0 + τ_t) − L(θ_P) = ½ Σ_{t≥0} w_t ‖τ_t − τ_P‖²_H.

:func:`jensen_gap` measures the left side with the real loss, :func:`fisher_weighted_spread` the right side with
the diagonal Fisher in place of H (``euclidean_spread``: H = I); both use the same weights, so both follow λ.
Under ``tangent`` the losses are those of the linearised network, in which composing is exact ensembling.

**Merging rules** (``ties``, ``magmax``, ``fisher``), whose τ_m is not Σ_t w_t τ_t with scalar weights: the gap is
taken against the composed parameters, mean_t L(θ0 + τ_t) − L(θ0 + τ_m), and the spreads about τ_m,
½ (1/T) Σ_t ‖τ_t − τ_m‖²; on a quadratic the two differ by the first-order term ∇L(θ0 + τ_m)·(τ̄ − τ_m), τ̄ the
plain mean, so ``centroid_offset`` = ‖τ̄ − τ_m‖ is recorded with them (``gap_definition: merged``).

Backbone features of each frozen task model θ0 + τ_s (and of θ0) on each experience's diagnostic examples are
cached (:class:`DiagnosticsCache`), so an evaluation after T experiences runs O(T) new forwards, not O(T²).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def jensen_gap(
    individual_losses: Sequence[float], composed_loss: float, weights: Sequence[float] | None = None
) -> float:
    """Σ_t w_t L(θ_t) − L(θ_P) (uniform w by default)."""
    w = [1.0 / len(individual_losses)] * len(individual_losses) if weights is None else list(weights)
    return float(sum(wi * li for wi, li in zip(w, individual_losses)) - composed_loss)


def fisher_weighted_spread(
    deltas: torch.Tensor,
    weights: Sequence[float],
    fisher: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
) -> float:
    """½ Σ_t w_t ‖τ_t − c‖²_F about c = τ_P = Σ_t w_t τ_t (or the given ``center``); ``deltas`` is (T, P),
    ``fisher`` (P,) or None (= identity)."""
    w = torch.as_tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    center = (w[:, None] * deltas).sum(0) if center is None else center
    diff2 = (deltas - center).pow(2)
    if fisher is not None:
        diff2 = diff2 * fisher
    return float(0.5 * (w * diff2.sum(1)).sum())


def cosine_matrix(deltas: torch.Tensor) -> list[list[float]]:
    """Pairwise cosine similarity of flattened task vectors (rows of ``deltas``)."""
    normed = F.normalize(deltas, dim=1)
    return (normed @ normed.T).tolist()


class DiagnosticsCache:
    """Per (task model, experience) backbone features and per task the flat τ_s, for frozen task vectors only;
    plus the seconds each evaluation's diagnostics took (``seconds``, one entry per task count)."""

    def __init__(self):
        self.features: dict[tuple, torch.Tensor] = {}
        self.flat: dict[int, torch.Tensor] = {}
        self.fingerprints: dict[int, tuple] = {}
        self.seconds: list[dict] = []

    def check(self, experience: int, x: torch.Tensor) -> None:
        """Drop what was cached for ``experience`` if its diagnostic examples changed."""
        fp = (tuple(x.shape), float(x.double().sum()), float(x.double().abs().sum()))
        if self.fingerprints.get(experience) != fp:
            self.features = {k: v for k, v in self.features.items() if k[1] != experience}
            self.fingerprints[experience] = fp

    def get(self, key: tuple, frozen: bool, compute):
        if not frozen:
            return compute()
        if key not in self.features:
            self.features[key] = compute()
        return self.features[key]

    def record_time(self, tasks: int, seconds: float) -> None:
        self.seconds = [s for s in self.seconds if s["tasks"] != tasks] + [{"tasks": tasks, "seconds": seconds}]


def _frozen(pool, s: int) -> bool:
    return not any(p.requires_grad for p in pool.task_parameters(s))


@torch.no_grad()
def second_order_diagnostics(model, batches, fisher=None, cache: DiagnosticsCache | None = None) -> dict:
    """Diagnostics of a :class:`~clcompose.strategies.task_vectors.composable.ComposableNet` on labelled batches
    ``[(x, y, experience), ...]`` (see the module docstring for the definitions).

    Losses are class-incremental cross-entropies over all seen classes (concatenated heads), averaged over the
    examples; the composed model is the one the model evaluates (its ``composition`` and coefficients).
    """
    start = time.perf_counter()
    cache = cache if cache is not None else DiagnosticsCache()
    pool, heads, comp = model.pool, model.heads, model.composition
    t = pool.num_tasks
    was_training = model.training
    model.eval()
    groups: dict[int, list] = {}
    for b in batches:
        groups.setdefault(int(b[2]) if len(b) > 2 else 0, []).append(b)
    data = []
    for e, bs in sorted(groups.items()):
        x, y = torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])
        cache.check(e, x)
        data.append((e, x, y))
    n = sum(len(y) for _, _, y in data)

    def chunked(fn, x):
        return torch.cat([fn(x[i : i + 256]) for i in range(0, len(x), 256)])

    def loss(features_of) -> float:
        return sum(float(F.cross_entropy(heads(features_of(e, x)), y, reduction="sum")) for e, x, y in data) / n

    linear = comp.rule == "tangent"
    composed = loss(lambda e, x: chunked(model.features, x))
    individual = [
        loss(
            lambda e, x, s=s: cache.get(
                ("tangent" if linear else "task", e, s),
                _frozen(pool, s),
                lambda: chunked(lambda b: model.individual_features(s, b), x),
            )
        )
        for s in range(t)
    ]
    for s in range(t):
        if s not in cache.flat and _frozen(pool, s):
            cache.flat[s] = pool.flat_delta(s)
    deltas = torch.stack([cache.flat[s] if s in cache.flat else pool.flat_delta(s) for s in range(t)])
    f = pool.flat_fisher(fisher.upto(t - 1)) if fisher is not None and len(fisher.counts) >= t else None
    row: dict = {"examples": int(n), "composed_loss": composed, "individual_losses": individual}
    if comp.weighted():
        w = list(model.composed_coefficients())
        w0 = 1.0 - sum(w)
        if abs(w0) > 1e-9:  # θ0 enters the affine combination (task arithmetic's λ-sum)
            base = pool.base_weights()
            row["base_loss"] = loss(
                lambda e, x: cache.get(("base", e), True, lambda: chunked(lambda b: pool.forward_with(base, b), x))
            )
            losses, weights = [row["base_loss"], *individual], [w0, *w]
            deltas_w = torch.cat([torch.zeros_like(deltas[:1]), deltas])
        else:
            losses, weights, deltas_w = individual, w, deltas
        row |= {
            "gap_definition": "weighted",
            "weights": w,
            "jensen_gap": jensen_gap(losses, composed, weights),
            "fisher_spread": fisher_weighted_spread(deltas_w, weights, f) if f is not None else None,
            "euclidean_spread": fisher_weighted_spread(deltas_w, weights, None),
        }
    else:
        merged = comp.merged_delta(pool)
        tau_m = torch.cat([merged[name].reshape(-1) for name in pool.names])
        uniform = [1.0 / t] * t
        row |= {
            "gap_definition": "merged",
            "jensen_gap": jensen_gap(individual, composed),
            "fisher_spread": fisher_weighted_spread(deltas, uniform, f, center=tau_m) if f is not None else None,
            "euclidean_spread": fisher_weighted_spread(deltas, uniform, None, center=tau_m),
            "centroid_offset": float((deltas.mean(0) - tau_m).norm()),
        }
    row |= {"tau_norm": deltas.norm(dim=1).tolist(), "cosine": cosine_matrix(deltas)}
    model.train(was_training)
    cache.record_time(t, time.perf_counter() - start)
    return row
