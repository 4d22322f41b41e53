"""The implicit (proximal) regulariser step, and the stability number of the explicit one.

The regulariser of ITA/IEL is a quadratic in the effective delta τ = ΔW with diagonal curvature a and linear
term b (:mod:`.regularizers`): R(τ) = ½ Σ a τ² − Σ b τ. The reference applies it as an explicit step
θ ← θ − s ∇R(θ) (s = the cosine factor lr_e/lr), which on the quadratic is τ ← (1 − s a) τ + s b: it
oscillates once s·a > 1 and diverges once s·a > 2 (the *stability number* s·max a, :func:`stability_number`).
The proximal step instead solves

    θ' = argmin_u  R(τ(u)) + ‖u − θ‖² / (2s),

which agrees with the explicit step to first order in s (θ' = θ − s∇R(θ) + O(s²)) and never diverges:
the objective at θ' is at most its value at θ, so R(τ(θ')) ≤ R(τ(θ)) and ‖θ' − θ‖² ≤ 2s (R(τ(θ)) − min R).

- full deltas (θ = τ): τ' = (τ + s b) / (1 + s a), elementwise;
- IA3 (τ_jk = W0_jk m_j, m = l − 1): per output row, with c_j = Σ_k a_jk W0_jk², d_j = Σ_k b_jk W0_jk,
  m' = (m + s d) / (1 + s c) — the exact minimiser, R being a quadratic in m;
- LoRA (τ = B A): R(BA) is quartic in (A, B), with no closed form; each sweep minimises the proximal objective
  exactly over A with B fixed, then over B with A fixed. Each block is a strongly convex quadratic:
  column k of A solves (I + s Bᵀ diag(a_:k) B) A'_:k = A_:k + s Bᵀ b_:k, row j of B solves
  (I + s A' diag(a_j:) A'ᵀ) B'_j: = B_j: + s A' b_j:ᵀ (r × r systems). Every block solve lowers the
  objective, so the bound above holds after any number of sweeps, and one sweep is already first-order exact
  (A' = A − s Bᵀ(a ⊙ BA − b) + O(s²), likewise B').
- a head penalty c/2 Σ (W − W_pre)² (c = 2(req (F + ε) + l2) for the suite's head regulariser):
  W' = W_pre + (W − W_pre) / (1 + s c).
"""

from __future__ import annotations

import torch


def prox_full(delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, s: float) -> torch.Tensor:
    """(τ + s b) / (1 + s a): the proximal step of the quadratic on a dense delta."""
    num = delta if b is None else delta + s * b
    return num / (1 + s * a)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def prox_ia3(scale: torch.Tensor, w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, s: float) -> torch.Tensor:
    """The exact proximal step on IA3's row scales l (τ = W0 ⊙ (l − 1)): m' = (m + s d)/(1 + s c), m = l − 1."""
    w = _rows(w0)
    c = (_rows(a) * w.pow(2)).sum(1)
    d = (_rows(b) * w).sum(1) if b is not None else 0.0
    return 1 + ((scale - 1) + s * d) / (1 + s * c)


def prox_lora(
    A: torch.Tensor, B: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, s: float, sweeps: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-coordinate proximal step on LoRA's factors (A: r × fan_in, B: out × r; a, b shaped like W)."""
    a2 = _rows(a)  # (out, fan_in)
    b2 = _rows(b) if b is not None else None
    r = A.shape[0]
    eye = torch.eye(r, dtype=A.dtype, device=A.device)
    A0, B0 = A, B
    for _ in range(sweeps):
        # A-block: (I + s Bᵀ diag(a_:k) B) per column k; Bᵀ diag(a_:k) B = Σ_j a_jk B_j B_jᵀ
        outer_b = (B[:, :, None] * B[:, None, :]).reshape(B.shape[0], r * r)  # (out, r²)
        m = eye + s * (a2.T @ outer_b).reshape(-1, r, r)  # (fan_in, r, r)
        rhs = A0.T + (s * (b2.T @ B) if b2 is not None else 0.0)  # (fan_in, r)
        A = torch.linalg.solve(m, rhs.unsqueeze(-1)).squeeze(-1).T
        # B-block: (I + s A diag(a_j:) Aᵀ) per row j
        outer_a = (A.T[:, :, None] * A.T[:, None, :]).reshape(A.shape[1], r * r)  # (fan_in, r²)
        n = eye + s * (a2 @ outer_a).reshape(-1, r, r)  # (out, r, r)
        rhs = B0 + (s * (b2 @ A.T) if b2 is not None else 0.0)  # (out, r)
        B = torch.linalg.solve(n, rhs.unsqueeze(-1)).squeeze(-1)
    return A, B


def prox_head(w: torch.Tensor, w_pre: torch.Tensor, c: torch.Tensor, s: float) -> torch.Tensor:
    """W_pre + (W − W_pre)/(1 + s c): the proximal step of (c/2) Σ (W − W_pre)²."""
    return w_pre + (w - w_pre) / (1 + s * c)


def stability_number(a: dict[str, torch.Tensor], s: float = 1.0) -> float:
    """s · max a: the explicit step τ ← (1 − s a) τ + s b diverges where this exceeds 2."""
    return float(s * max(float(v.max()) for v in a.values())) if a else 0.0


def ia3_curvature(a: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """max_j Σ_k a_jk W0_jk²: the explicit step's curvature in IA3's own parameters l."""
    return max(float((_rows(a[n]) * _rows(base[n]).pow(2)).sum(1).max()) for n in a) if a else 0.0
