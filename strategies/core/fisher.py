"""Diagonal true Fisher information from per-example gradients (torch.func), and its accumulation.

For a model with predictive distribution p(c | x; W) the diagonal true Fisher is

    F(W) = E_x Σ_c p(c|x) (∂ log p(c|x) / ∂W)²,

an expectation over the model's own labels (not the data labels, and not squared batch gradients).
Estimators:

- ``exact``:   all classes, one vector-Jacobian product per class and example (``jacrev``);
- ``topk``:    only the k most probable classes per example, weighted by their probability (a truncation
  of the sum, i.e. a lower bound; k/C of the exact cost);
- ``sampled``: ``n`` labels drawn per example from p(·|x), F ≈ mean of (∂ log p(y|x)/∂W)² (unbiased,
  n/C of the exact cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from torch.func import grad, jacrev, vmap

FisherMode = Literal["exact", "topk", "sampled"]
LogProbFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def fisher_sum(
    log_prob: LogProbFn,
    params: Mapping[str, torch.Tensor],
    inputs: Iterable[torch.Tensor],
    mode: FisherMode = "exact",
    k: int = 3,
    samples: int = 1,
    chunk: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over examples of Σ_c p_c (∇_W log p_c)² (or its top-k / sampled estimate), and the example count.

    ``log_prob(params, x)`` maps ONE example ``x`` (no batch dimension) to the log-probabilities of the
    classes in play. ``inputs`` yields batches; they are processed ``chunk`` examples at a time.
    """
    params = {n: p.detach() for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0

    def accumulate(per_example: Mapping[str, torch.Tensor], weights: torch.Tensor) -> None:
        # per_example[n]: (B, K, *shape); weights: (B, K) → Σ_b Σ_k w_bk g_bk²
        for n, g in per_example.items():
            total[n] += torch.einsum("bk,bk...->...", weights, g.pow(2))

    for batch in inputs:
        for xb in torch.split(batch, chunk):
            with torch.no_grad():
                p = vmap(log_prob, in_dims=(None, 0))(params, xb).exp()
            if mode == "exact":
                jac = vmap(jacrev(log_prob), in_dims=(None, 0))(params, xb)
                accumulate(jac, p)
            elif mode == "topk":
                kk = min(k, p.shape[1])
                top_p, top_i = p.topk(kk, dim=1)
                jac = vmap(jacrev(lambda w, x, i: log_prob(w, x)[i]), in_dims=(None, 0, 0))(params, xb, top_i)
                accumulate(jac, top_p)
            elif mode == "sampled":
                # drawn on the CPU (a CPU generator's stream, the same draws on any device), as per_example does
                labels = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator).to(p.device)
                g = vmap(jacrev(lambda w, x, y: log_prob(w, x)[y]), in_dims=(None, 0, 0))(params, xb, labels)
                accumulate(g, torch.full(labels.shape, 1.0 / samples, device=p.device))
            else:
                raise ValueError(f"unknown Fisher mode {mode!r}; valid: exact, topk, sampled")
            count += xb.shape[0]
    return total, count


def per_example_grads(
    loss: Callable, params: Mapping[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """∂ loss(params, x_b, y_b) / ∂params for every example b (used by tests and diagnostics)."""
    return vmap(grad(loss), in_dims=(None, 0, 0))({n: p.detach() for n, p in params.items()}, xb, yb)


class FisherAccumulator:
    """Unnormalised per-experience Fisher sums U_s and example counts n_s.

    ``past(t)`` = (ε + Σ_{s<t} U_s) / N_{<t}   (ITA's F̂: the experiences before t; ε alone at t = 0)
    ``upto(t)`` = ε + Σ_{s≤t} U_s / N_{≤t}     (IEL's F̄: cumulative, including experience t)
    Counts are exact per experience, so unequal experience sizes are weighted correctly.
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = eps
        self.sums: list[dict[str, torch.Tensor]] = []
        self.counts: list[int] = []

    def add(self, sums: Mapping[str, torch.Tensor], count: int) -> None:
        self.sums.append({n: s.detach().clone() for n, s in sums.items()})
        self.counts.append(int(count))

    def _total(self, upto: int) -> tuple[dict[str, torch.Tensor], int]:
        names = self.sums[0].keys()
        total = {n: sum(s[n] for s in self.sums[:upto]) for n in names}
        return total, sum(self.counts[:upto])

    def past(self, t: int, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if t == 0 or not self.sums:
            return {n: torch.full_like(w, self.eps) for n, w in like.items()}
        total, n = self._total(t)
        return {k: (self.eps + v) / n for k, v in total.items()}

    def upto(self, t: int) -> dict[str, torch.Tensor]:
        total, n = self._total(t + 1)
        return {k: self.eps + v / n for k, v in total.items()}

    def state_dict(self) -> dict:
        return {"eps": self.eps, "sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.eps, self.sums, self.counts = state["eps"], state["sums"], state["counts"]
