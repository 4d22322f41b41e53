"""The reference code's diagonal Gaussian mixture (class statistics of θ0 features), restated in torch.

The reference (mammoth's ``second_order``, after the ``gmm-torch`` package) fits each class with
``n_components`` = 5 diagonal Gaussians:

- **k-means init** on the features min–max scaled to [0, 1] (one scale for all coordinates): 50 draws of k
  distinct points as centres, keeping the draw with the lowest Σ_c mean_{x ∈ c} ‖x − μ_c‖; then Lloyd
  iterations until no centre moves more than 1e-3; the centres are scaled back. Here an empty cluster keeps its
  centre (the reference would produce NaN and restart), and Lloyd stops after 1000 iterations at most.
- **EM** from π = 1/k, σ² = 1: while i ≤ n_iter and the mean log-likelihood improved by at least 1e-3 (so at
  most n_iter + 1 steps), E-step responsibilities r_nk ∝ π_k p_k(x_n), then
  P_k = Σ_n r_nk + ε, μ_k = Σ_n r_nk x_n / P_k, σ²_k = Σ_n r_nk x_n²/P_k − 2 μ_k Σ_n r_nk x_n/P_k + μ_k² + ε,
  π_k = P_k / N, with ε = 1e-6. (The reference's revert on a worsening step re-assigns the already updated
  tensors, i.e. does nothing; it is not restated.) A non-finite log-likelihood stops at the previous step.
- **density** (``reference_density``): the reference's diagonal log-density uses 1/σ where 1/σ² belongs,
  log p = −½ (d log 2π + Σ (x − μ)²/σ + Σ log σ); with ``reference_density=False`` the correct
  −½ (d log 2π + Σ (x − μ)²/σ² + Σ log σ²) is used.
"""

from __future__ import annotations

import math

import torch


def kmeans_init(
    x: torch.Tensor, k: int, generator: torch.Generator, init_times: int = 50, min_delta: float = 1e-3
) -> torch.Tensor:
    """k initial means (k × d) as the reference's ``get_kmeans_mu`` computes them (see the module docstring)."""
    lo, hi = x.min(), x.max()
    z = (x - lo) / (hi - lo).clamp_min(1e-12)
    best, best_cost = None, math.inf
    for _ in range(init_times):
        centres = z[torch.randperm(len(z), generator=generator)[:k]]
        assign = torch.cdist(z, centres).argmin(1)
        cost = sum(float((z[assign == c] - centres[c]).norm(dim=1).mean()) for c in range(k) if (assign == c).any())
        if cost < best_cost:
            best, best_cost = centres.clone(), cost
    centres = best
    for _ in range(1000):
        assign = torch.cdist(z, centres).argmin(1)
        old = centres.clone()
        for c in range(k):
            if (assign == c).any():
                centres[c] = z[assign == c].mean(0)
        if float((old - centres).norm(dim=1).max()) <= min_delta:
            break
    return centres * (hi - lo) + lo


def log_density(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, reference_density: bool) -> torch.Tensor:
    """log p_k(x_n) for every example and component: (N, k)."""
    d = x.shape[1]
    diff2 = (x[:, None, :] - mu[None]).pow(2)
    if reference_density:
        prec = var.rsqrt()  # 1/σ, as the reference computes it
        return -0.5 * (d * math.log(2 * math.pi) + (diff2 * prec).sum(-1) - prec.log().sum(-1))
    return -0.5 * (d * math.log(2 * math.pi) + (diff2 / var).sum(-1) + var.log().sum(-1))


def em_step(
    x: torch.Tensor, pi: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, reference_density: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One E + M step (the reference's update formulas, module docstring)."""
    weighted = log_density(x, mu, var, reference_density) + pi.log()
    resp = (weighted - weighted.logsumexp(1, keepdim=True)).exp()  # (N, k)
    p = resp.sum(0) + eps
    mu_new = (resp.T @ x) / p[:, None]
    x2 = (resp.T @ x.pow(2)) / p[:, None]
    xmu = mu_new * (resp.T @ x) / p[:, None]
    var_new = x2 - 2 * xmu + mu_new.pow(2) + eps
    return p / len(x), mu_new, var_new


def mean_log_likelihood(x, pi, mu, var, reference_density: bool) -> float:
    return float((log_density(x, mu, var, reference_density) + pi.log()).logsumexp(1).mean())


def fit_reference_gmm(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    n_iter: int = 500,
    delta: float = 1e-3,
    eps: float = 1e-6,
    reference_density: bool = True,
    init_means: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights (k,), means (k, d), variances (k, d)) of a diagonal mixture fitted as the reference does."""
    x = x.double()
    mu = (init_means if init_means is not None else kmeans_init(x, k, generator)).double()
    pi = torch.full((k,), 1.0 / k, dtype=x.dtype)
    var = torch.ones_like(mu)
    ll, i, gain = -math.inf, 0, math.inf
    while i <= n_iter and gain >= delta:
        new = em_step(x, pi, mu, var, reference_density, eps)
        new_ll = mean_log_likelihood(x, *new, reference_density)
        if not math.isfinite(new_ll):
            break
        pi, mu, var = new
        i, gain, ll = i + 1, new_ll - ll, new_ll
    return pi.float(), mu.float(), var.float()
