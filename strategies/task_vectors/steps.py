"""How the regulariser acts on a training step: the mixin :class:`RegularizerSteps` of the task-vector strategies.

``reg_step``:

- ``coupled``: R is a term of the loss (through the surrogate Σ⟨∇R, ΔW⟩, :func:`..regularizers.surrogate`), so
  the optimiser sees CE + R gradients together;
- ``decoupled`` (the reference code's update): before the optimiser's step on the CE gradient, a separate
  explicit plain-SGD step θ ← θ − s clip(∇R) on the current task vector and head, with s = lr_e / lr the cosine
  schedule's factor and clip the per-parameter norm clip of ``torch.nn.utils.clip_grad_norm_``
  (g · min(1, c / (‖g‖ + 1e-6)), c = ``clip_grad``);
- ``proximal`` (default): at the same place, the implicit step θ ← argmin_u R(u) + ‖u − θ‖²/(2s)
  (:mod:`.proximal`), no clip needed: the reference's update to first order in s·a, and stable for any strength.

Both separate steps run once per optimiser step, i.e. once per virtual batch under gradient accumulation.
Each experience records the stability number of the explicit step (s·max a with s = 1, the first epoch's
factor, and a the regulariser's curvature on ΔW: ITA α F̂, IEL β (1 − r) F̄ with r = 1/T, ½ at T = 1,
:mod:`.regularizers`), also in the tuned parameters' own coordinates for IA3, and the head's; when one
exceeds 2 under ``decoupled`` a warning goes to the log and to ``strategy_extras.warnings``, once per run.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from clcompose.strategies.task_vectors import proximal as P
from clcompose.strategies.task_vectors import regularizers as R

log = logging.getLogger("clcompose.task_vectors")


class RegularizerSteps:
    """Regulariser steps of a :class:`~clcompose.strategies.task_vectors.base.TaskVectorStrategy`
    (needs its ``options``, ``pool``, ``task``, ``model.heads``, ``anchor``, ``head_fisher``,
    ``head_reg_fisher``, ``optimizer``, ``train_config`` and the current quadratic ``_quad``)."""

    _quad: R.Quadratic | None = None

    # ------------------------------------------------------------------ the regulariser's pieces
    def backbone_reg_grads(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(ΔW_T with graph, closed-form ∂R/∂ΔW_T) or None when the backbone is unregularised."""
        if self._quad is None:
            return None
        current = self.pool.deltas(self.task)
        return current, self.regularizer_grads(current)

    def regularizer_grads(self, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Closed-form ∂R/∂ΔW_T = a ΔW_T − b of the backbone regulariser at the current deltas."""
        return R.quadratic_grad(self._quad, current)

    def head_curvature(self) -> dict[str, torch.Tensor] | None:
        """c per head parameter such that the head penalty is Σ (c/2)(W − W_pre)²:
        c = 2 (req (F_cls + ε) + l2) (F_cls = 0 while the head Fisher is unknown); None without a penalty."""
        req, l2 = self.head_reg_fisher, self.options.head_reg_l2
        if self.anchor is None or (req == 0 and l2 == 0):
            return None
        out = {}
        for name in ("weight", "bias"):
            ref = getattr(self.anchor.heads[self.task], name)
            fisher = self.head_fisher[name] if self.head_fisher is not None else torch.zeros_like(ref)
            out[name] = 2 * (req * (fisher + self.options.eps) + l2)
        return out

    def head_penalty(self) -> torch.Tensor | None:
        """req · Σ (F_cls + ε)(W − W_pre)² + l2 · ‖W − W_pre‖² over the current head's weight and bias."""
        curv = self.head_curvature()
        if curv is None:
            return None
        head, pre = self.model.heads.heads[self.task], self.anchor.heads[self.task]
        return sum((0.5 * curv[n] * (getattr(head, n) - getattr(pre, n)).pow(2)).sum() for n in curv)

    # ------------------------------------------------------------------ the steps
    def step_size(self) -> float:
        """s_e = lr_e / lr: the cosine schedule's factor of the current epoch (1 without a schedule)."""
        return self.optimizer.param_groups[0]["lr"] / self.train_config.lr

    def optimizer_step(self):
        if self.options.reg_step in ("decoupled", "proximal"):
            t = time.perf_counter()
            if self.options.reg_step == "decoupled":
                self._explicit_regularizer_step()
            else:
                self._proximal_regularizer_step()
            self.regularizer_step_s += time.perf_counter() - t  # measured apart (the record's `preparation`)
        self.optimizer.step()

    @torch.no_grad()
    def _explicit_regularizer_step(self) -> None:
        """θ ← θ − s clip(∇R) on the task vector's and the head's parameters (gradients at the current θ)."""
        s = self.step_size()
        steps: list[tuple[nn.Parameter, torch.Tensor]] = []
        with torch.enable_grad():
            reg = self.backbone_reg_grads()
            if reg is not None:
                params = self.pool.task_parameters(self.task)
                steps += list(zip(params, R.chain_to_params(reg[0], reg[1], params)))
            head = self.head_penalty()
            if head is not None:
                params = list(self.model.heads.heads[self.task].parameters())
                steps += list(zip(params, torch.autograd.grad(head, params)))
        clip = self.options.clip_grad
        for p, g in steps:
            coef = min(1.0, clip / (float(g.norm()) + 1e-6))  # clip_grad_norm_ on this parameter alone
            p.sub_(g, alpha=s * coef)

    @torch.no_grad()
    def _proximal_regularizer_step(self) -> None:
        """θ ← prox_{sR}(θ): closed forms for full/IA3 deltas and the head, block sweeps for LoRA."""
        s, t = self.step_size(), self.task
        if self._quad is not None:
            a, b = self._quad
            base = self.pool.base_weights()
            for name, mod in zip(self.pool.names, self.pool.vectors[t]):
                bn = b[name] if b is not None else None
                if self.pool.style == "full":
                    mod.delta.copy_(P.prox_full(mod.delta, a[name], bn, s))
                elif self.pool.style == "ia3":
                    mod.scale.copy_(P.prox_ia3(mod.scale, base[name], a[name], bn, s))
                else:
                    A, B = P.prox_lora(mod.A, mod.B, a[name], bn, s, self.options.prox_sweeps)
                    mod.A.copy_(A)
                    mod.B.copy_(B)
        curv = self.head_curvature()
        if curv is not None:
            head, pre = self.model.heads.heads[t], self.anchor.heads[t]
            for name, c in curv.items():
                p = getattr(head, name)
                p.copy_(P.prox_head(p, getattr(pre, name), c, s))

    # ------------------------------------------------------------------ stability of the explicit step
    def _record_stability(self, t: int) -> None:
        row: dict = {"experience": t, "reg_step": self.options.reg_step}
        if self._quad is not None:
            a = self._quad[0]
            row["stability"] = P.stability_number(a)
            style = self.pool.style
            row["stability_params"] = (
                row["stability"]
                if style == "full"
                else P.ia3_curvature(a, self.pool.base_weights())
                if style == "ia3"
                else None  # LoRA: the curvature in (A, B) depends on A and B themselves
            )
        curv = self.head_curvature()
        row["head_stability"] = max(float(c.max()) for c in curv.values()) if curv else None
        self.stability.append(row)
        parts = {
            "stability": "task vector (ΔW)",
            "stability_params": "task vector (own parameters)",
            "head_stability": "head",
        }
        worst = max(((row[k], v) for k, v in parts.items() if row.get(k) is not None), default=(0.0, ""))
        if self.options.reg_step == "decoupled" and worst[0] > 2:
            self.warn_once(
                "unstable",
                f"experience {t}: the explicit (decoupled) regulariser step on the {worst[1]} has stability number "
                f"{worst[0]:.3g} > 2 (step × curvature): it oscillates and may diverge; reg_step=proximal is stable",
            )

    def warn_once(self, key: str, message: str) -> None:
        """Log ``message`` and keep it for the record, once per run and ``key``."""
        if key in self.warned:
            return
        self.warned.add(key)
        self.warnings.append(message)
        log.warning(message)
