"""A pool of per-experience task vectors τ_t around a frozen pre-trained network θ0.

For every targeted layer with weight W0 (``nn.Linear`` or ``nn.Conv2d``), task ``t`` owns a module that
produces an additive weight delta ΔW_t:

- ``full``: a dense ΔW_t, initialised to 0;
- ``lora``: ΔW_t = B_t A_t (W viewed as out × fan-in), B_t = 0 and A_t ~ U(−b, b), b = 1/√(r·fan-in), at start
  (the reference's Kaiming-uniform, see :class:`LoRADelta`); a layer named ``*attn.qkv`` (a ViT's fused
  query/key/value map) gets rank ``qkv_rank_multiplier`` × r;
- ``ia3``:  ΔW_t = W0 ⊙ (l_t − 1), one scale per output row, l_t = 1 at start.

The network is evaluated at θ0 + Σ_t c_t τ_t through :func:`torch.func.functional_call`, so no copy of the
network is made per task; only the targeted weights are swapped for the forward.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

TuningStyle = Literal["full", "lora", "ia3"]


class FullDelta(nn.Module):
    """ΔW = D, a dense delta initialised to zero."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(base))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return self.delta


class LoRADelta(nn.Module):
    """ΔW = B A with W viewed as (out, fan-in); B = 0 so ΔW = 0 at start.

    A is initialised as the reference code does: Kaiming-uniform with a = √5 on a (1, r, fan_in) tensor, for
    which torch counts fan_in_torch = r · fan_in (size(1) × receptive field). The bound is then
    gain · √(3 / fan_in_torch) with gain = √(2 / (1 + a²)) = 1/√3, i.e. b = 1/√(r · fan_in), and
    Var A = b²/3 = 1/(3 r fan_in). (Kaiming on the (r, fan_in) matrix itself gives b = 1/√fan_in, √r larger.)
    The draw is the same ``uniform_`` call, so it consumes the random stream exactly as the reference's does.
    """

    def __init__(self, base: torch.Tensor, rank: int):
        super().__init__()
        out, fan_in = base.shape[0], base[0].numel()
        r = max(1, min(rank, out, fan_in))
        self.A = nn.Parameter(torch.empty(r, fan_in, dtype=base.dtype, device=base.device))
        self.B = nn.Parameter(torch.zeros(out, r, dtype=base.dtype, device=base.device))
        bound = 1.0 / math.sqrt(r * fan_in)
        with torch.no_grad():
            self.A.uniform_(-bound, bound)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return (self.B @ self.A).reshape(base.shape)


class IA3Delta(nn.Module):
    """ΔW = W0 ⊙ (l − 1), l scaling each output row, initialised to 1."""

    def __init__(self, base: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(base.shape[0], dtype=base.dtype, device=base.device))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (base.dim() - 1)
        return base * (self.scale.view(shape) - 1)


def select_layers(model: nn.Module, layers: str | Sequence[str] = "all") -> list[str]:
    """Names of the weight tensors to tune: ``"all"`` (every Linear and Conv2d), ``"linear"``, ``"conv"``,
    or fnmatch patterns over module names (``"blocks.*.mlp.fc*"``); a pattern that is exactly the name of a
    parameter selects that tensor whatever its module (e.g. a template network's mixture logits ``"xi"``)."""
    kinds = {"all": (nn.Linear, nn.Conv2d), "linear": (nn.Linear,), "conv": (nn.Conv2d,)}
    patterns = None
    if isinstance(layers, str) and layers in kinds:
        wanted = kinds[layers]
    else:
        wanted = (nn.Linear, nn.Conv2d)
        patterns = [layers] if isinstance(layers, str) else list(layers)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, wanted) and getattr(module, "weight", None) is not None:
            if patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns):
                names.append(f"{name}.weight")
    if patterns is not None:
        names += [n for n, _ in model.named_parameters() if n in patterns and n not in names]
    if not names:
        raise ValueError(f"no Linear/Conv2d layer of the model matches layers={layers!r}")
    return names


class TaskVectorPool(nn.Module):
    """Per-task weight deltas for a fixed set of layers of ``model`` (θ0 stays frozen and shared).

    ``model`` is typically the backbone; its parameters are frozen by the pool. ``vectors[t][i]`` is task t's
    module for the i-th targeted weight (names in ``self.names``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "all",
        style: TuningStyle = "lora",
        rank: int = 4,
        qkv_rank_multiplier: int = 1,
    ):
        super().__init__()
        if style not in ("full", "lora", "ia3"):
            raise ValueError(f"unknown tuning style {style!r}; valid: full, lora, ia3")
        self.model = model
        self.style = style
        self.rank = rank
        self.qkv_rank_multiplier = qkv_rank_multiplier
        self.names = select_layers(model, layers)
        for p in model.parameters():
            p.requires_grad_(False)
        self.vectors = nn.ModuleList()

    # ------------------------------------------------------------------ structure
    @property
    def num_tasks(self) -> int:
        return len(self.vectors)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """θ0 of the targeted layers (the model's own, frozen, parameters)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.names}

    def add_task(self) -> int:
        """Append a fresh task vector (τ = 0) and return its index."""
        base = self.base_weights()
        if self.style == "full":
            mods = [FullDelta(base[n].detach()) for n in self.names]
        elif self.style == "lora":
            mods = [LoRADelta(base[n].detach(), self.rank_of(n)) for n in self.names]
        else:
            mods = [IA3Delta(base[n].detach()) for n in self.names]
        self.vectors.append(nn.ModuleList(mods))
        return len(self.vectors) - 1

    def rank_of(self, name: str) -> int:
        """LoRA rank of a targeted weight: ``rank``, times ``qkv_rank_multiplier`` for a fused ``attn.qkv``
        (three maps stacked in one weight, so each keeps rank r, as in the reference)."""
        return self.rank * (self.qkv_rank_multiplier if name.endswith("attn.qkv.weight") else 1)

    def task_parameters(self, t: int) -> list[nn.Parameter]:
        return list(self.vectors[t].parameters())

    def freeze(self, t: int) -> None:
        for p in self.task_parameters(t):
            p.requires_grad_(False)

    # ------------------------------------------------------------------ deltas and composition
    def deltas(self, t: int) -> dict[str, torch.Tensor]:
        """Effective ΔW_t per targeted weight (differentiable w.r.t. task t's parameters)."""
        base = self.base_weights()
        return {n: m(base[n]) for n, m in zip(self.names, self.vectors[t])}

    def delta_sum(
        self, coefficients: Mapping[int, float] | Sequence[float], detach: bool = False
    ) -> dict[str, torch.Tensor]:
        """Σ_t c_t ΔW_t per weight; tasks with coefficient 0 contribute exactly nothing.

        Without a graph to keep (``detach`` or no gradient mode) the sum accumulates in place, through one scratch
        tensor per weight: the same two roundings per term as ``out + c * d`` (the product, then the sum), without
        two fresh weight-sized tensors per task and weight (at 20 LoRA tasks on EfficientNet-Lite0, most of the
        materialisation's time)."""
        coeffs = dict(enumerate(coefficients)) if not isinstance(coefficients, Mapping) else dict(coefficients)
        base = self.base_weights()
        out = {n: torch.zeros_like(w) for n, w in base.items()}
        terms = [(t, c) for t, c in coeffs.items() if c != 0]
        if detach or not torch.is_grad_enabled():
            # weight by weight (the tasks in the same order, so the same sums), so each weight's sum and scratch
            # stay in cache while every task's term is added
            with torch.no_grad():
                for i, n in enumerate(self.names):
                    buf = torch.empty_like(out[n])
                    for t, c in terms:
                        out[n].add_(torch.mul(self.vectors[t][i](base[n]), c, out=buf))
            return out
        for t, c in terms:
            for n, d in self.deltas(t).items():
                out[n] = out[n] + c * (d.detach() if detach else d)
        return out

    def weights(
        self,
        coefficients: Mapping[int, float] | Sequence[float] | None = None,
        extra: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """θ0 + Σ_t c_t τ_t (+ ``extra`` deltas) for the targeted weights; default c_t = 1/T."""
        if coefficients is None:
            coefficients = self.uniform()
        total = self.delta_sum(coefficients)
        base = self.base_weights()
        if torch.is_grad_enabled():
            return {n: base[n] + total[n] + (extra[n] if extra is not None else 0) for n in self.names}
        # in place into the fresh sums: base + total is total + base, bit for bit
        return {n: total[n].add_(base[n]).add_(extra[n] if extra is not None else 0) for n in self.names}

    def uniform(self, num_tasks: int | None = None) -> list[float]:
        t = self.num_tasks if num_tasks is None else num_tasks
        return [1.0 / t] * t if t else []

    def forward_with(self, weights: Mapping[str, torch.Tensor], *args, **kwargs):
        """Run the wrapped model with its targeted weights replaced by ``weights``."""
        return functional_call(self.model, dict(weights), args, kwargs, strict=False)

    def forward(self, x: torch.Tensor, coefficients=None) -> torch.Tensor:
        return self.forward_with(self.weights(coefficients), x)

    # ------------------------------------------------------------------ flat views (diagnostics, skills)
    def flat_delta(self, t: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([d.reshape(-1) for d in self.deltas(t).values()])

    def flat_fisher(self, fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([fisher[n].reshape(-1) for n in self.names])

    def trainable_count(self, t: int) -> int:
        return sum(p.numel() for p in self.task_parameters(t))
