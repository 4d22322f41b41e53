"""ITA and IEL regularisers on effective weight deltas ΔW, as explicit objectives and closed-form gradients.

Notation (per targeted weight, elementwise): τ_s = ΔW_s, T = number of experiences including the current.

ITA (Porrello et al. 2025, Eq. 11–12):   R = (α/2) Σ F̂ τ_T²                ∇_{τ_T} R = α F̂ τ_T
IEL (Eq. 18–19):  R = (β/2) Σ_{s≤T} ‖τ_s − τ̄‖²_F̄,  τ̄ = (1/T) Σ_{s≤T} τ_s
                  ∇_{τ_T} R = β F̄ [(1 − 1/T) τ_T − (1/T) Σ_{s<T} τ_s]

IEL at T = 1 (first experience) uses the reference convention r = 1/2, i.e. the gradient (β/2) F̄ τ_1,
the gradient of (β/4)‖τ_1‖²_F̄ — as if θ0 (τ = 0) were a second member of the ensemble.
The gradient w.r.t. the parameters of a LoRA/IA3 module follows by the chain rule (:func:`chain_to_params`).

Both are quadratics in τ_T with a diagonal curvature, R(τ_T) = ½ Σ a τ_T² − Σ b τ_T + const and ∇R = a τ_T − b
(:func:`ita_quadratic`, :func:`iel_quadratic`): ITA a = α F̂, b = 0; IEL a = β (1 − r) F̄, b = β r F̄ Σ_{s<T} τ_s
with r = 1/T (r = ½, b = 0 at T = 1). The proximal step (:mod:`.proximal`) and the stability number of the
explicit step (max s·a) are written in these terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Deltas = Mapping[str, torch.Tensor]


def ita_penalty(alpha: float, fisher: Deltas, current: Deltas) -> torch.Tensor:
    """(α/2) Σ F̂ τ_T² — the explicit ITA objective."""
    return 0.5 * alpha * sum((fisher[n] * current[n].pow(2)).sum() for n in current)


def ita_grad(alpha: float, fisher: Deltas, current: Deltas) -> dict[str, torch.Tensor]:
    """α F̂ τ_T, the closed-form gradient of :func:`ita_penalty` w.r.t. τ_T."""
    return {n: alpha * fisher[n] * current[n].detach() for n in current}


def iel_penalty(beta: float, fisher: Deltas, current: Deltas, past: Sequence[Deltas]) -> torch.Tensor:
    """(β/2) Σ_{s≤T} ‖τ_s − τ̄‖²_F̄ over all task vectors (past ones as given); T = 1 → (β/4)‖τ_1‖²_F̄."""
    vectors = list(past) + [current]
    t = len(vectors)
    total = 0.0
    for n in current:
        if t == 1:
            total = total + 0.25 * beta * (fisher[n] * current[n].pow(2)).sum()
            continue
        mean = sum(v[n] for v in vectors) / t
        total = total + 0.5 * beta * sum((fisher[n] * (v[n] - mean).pow(2)).sum() for v in vectors)
    return total


def iel_grad(
    beta: float, fisher: Deltas, current: Deltas, past_sum: Deltas | None, num_tasks: int
) -> dict[str, torch.Tensor]:
    """β F̄ [(1 − 1/T) τ_T − (1/T) Σ_{s<T} τ_s]; ``past_sum`` is the cached Σ_{s<T} τ_s, so the cost is O(1) in T."""
    if num_tasks == 1:
        return {n: 0.5 * beta * fisher[n] * current[n].detach() for n in current}
    r = 1.0 / num_tasks
    return {n: beta * fisher[n] * ((1 - r) * current[n].detach() - r * past_sum[n]) for n in current}


def chain_to_params(deltas: Deltas, grads: Deltas, params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Gradients of the parameters that produce ``deltas`` (ΔW = f(params)), given ∂R/∂ΔW = ``grads``.

    A vector–Jacobian product through the parametrisation: for LoRA this is ∂A = Bᵀ G, ∂B = G Aᵀ; for
    IA3 ∂l_j = Σ_k G_jk W0_jk; for full deltas the identity.
    """
    names = list(deltas)
    out = torch.autograd.grad(
        [deltas[n] for n in names], list(params), grad_outputs=[grads[n] for n in names], allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def surrogate(deltas: Deltas, grads: Deltas) -> torch.Tensor:
    """Σ ⟨G, ΔW⟩ with G detached: its autograd gradient is exactly the closed form chained to the parameters.
    Added to the loss for the *coupled* regulariser (the optimiser then sees CE + R gradients together)."""
    return sum((grads[n].detach() * deltas[n]).sum() for n in deltas)


Quadratic = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]


def ita_quadratic(alpha: float, fisher: Deltas) -> Quadratic:
    """(a, b) of ITA's (α/2) Σ F̂ τ_T²: a = α F̂, b = 0 (None)."""
    return {n: alpha * f for n, f in fisher.items()}, None


def iel_quadratic(beta: float, fisher: Deltas, past_sum: Deltas | None, num_tasks: int) -> Quadratic:
    """(a, b) of IEL's objective in τ_T: a = β(1 − r) F̄, b = β r F̄ Σ_{s<T} τ_s, r = 1/T (T = 1: r = ½, b = 0).

    From ∇R = β F̄ [(1 − r) τ_T − r Σ_{s<T} τ_s] = a τ_T − b (:func:`iel_grad`)."""
    if num_tasks == 1:
        return {n: 0.5 * beta * f for n, f in fisher.items()}, None
    r = 1.0 / num_tasks
    return {n: beta * (1 - r) * f for n, f in fisher.items()}, {
        n: beta * r * f * past_sum[n] for n, f in fisher.items()
    }


def quadratic_grad(quad: Quadratic, current: Deltas) -> dict[str, torch.Tensor]:
    """a τ − b at the current deltas (the closed-form gradient of the quadratic)."""
    a, b = quad
    return {n: a[n] * current[n].detach() - (b[n] if b is not None else 0.0) for n in current}
