"""InfLoRA (Liang & Li, CVPR 2024, "Interference-Free Low-Rank Adaptation for Continual Learning") on the ViT.

Every block's qkv projection W gets a low-rank update ΔW = B A (standard LoRA names: A ∈ R^{r×d_in} projects
down, B ∈ R^{d_out×r}; the paper calls them B_t and A_t). Per experience t, in the frozen ViT:

1. before training, the inputs H_t ∈ R^{n×d_in} of the layer (tokens of up to ``max_examples`` training images)
   are projected off the stored subspace M (orthonormal columns, d_in × k) of earlier experiences, and A_t is
   the top-r right singular vectors of H_t (I − M Mᵀ), so that A_t M = 0: the update B A x is zero for every
   input x in span(M), whatever B learns;
2. A_t is fixed and B_t (initialised at 0) is trained, with the heads, by CE on the current classes' logits;
3. after training, W ← W + B_t A_t (merged), and M grows by the left-over directions of the new inputs: with
   R = H_t (I − M Mᵀ) and σ_i its singular values, the fewest directions i = 1…k' such that
   ‖H_t M‖² + Σ_{i≤k'} σ_i² ≥ ε ‖H_t‖² (GPM's energy criterion, ε = ``threshold``).

Differences from the paper: M is stored directly (DualGPM stores the orthogonal complement once M fills more
than half the space: the same subspace, smaller); ε is one constant (the paper raises it over tasks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.prompts.vit import PromptedViT, PromptStrategy, prompt_template_kwargs


@dataclasses.dataclass
class InfLoRAOptions(Options):
    """InfLoRA: rank-``rank`` LoRA on every qkv, A orthogonal to past inputs' subspace (energy ``threshold``)."""

    rank: int = 10
    threshold: float = 0.95  # ε of the subspace update
    max_examples: int = 256  # training images whose tokens form H_t
    mask_past_logits: bool = True

    def check(self) -> None:
        self.require(self.rank >= 1, "rank", "must be >= 1")
        self.require(0 < self.threshold <= 1, "threshold", "must be in (0, 1]")
        self.require(self.max_examples >= 1, "max_examples", "must be >= 1")


def orthogonal_design(inputs: torch.Tensor, basis: torch.Tensor, rank: int) -> torch.Tensor:
    """A [rank, d_in]: top right singular vectors of inputs (I − M Mᵀ), rows orthogonal to M's columns
    (zero rows where the projected inputs have fewer directions)."""
    projected = inputs - (inputs @ basis) @ basis.T
    _, s, vh = torch.linalg.svd(projected.double(), full_matrices=False)
    a = torch.zeros(rank, inputs.shape[1], dtype=torch.float64)
    keep = min(rank, int((s > s.max() * 1e-6).sum()) if len(s) else 0)
    a[:keep] = vh[:keep]
    a = a - (a @ basis.double()) @ basis.double().T  # exact orthogonality up to rounding
    return a.to(inputs.dtype)


def grow_subspace(inputs: torch.Tensor, basis: torch.Tensor, threshold: float) -> torch.Tensor:
    """M extended by the fewest left-over directions of ``inputs`` that reach ``threshold`` of its energy."""
    h = inputs.double()
    m = basis.double()
    total = h.pow(2).sum()
    covered = (h @ m).pow(2).sum()
    residual = h - (h @ m) @ m.T
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    need, k = threshold * total - covered, 0
    energy = s.pow(2).cumsum(0)
    if need > 0:
        k = int((energy < need).sum()) + 1
        k = min(k, len(s), h.shape[1] - m.shape[1])
    new = vh[:k].T
    out = torch.cat([m, new], dim=1)
    q, _ = torch.linalg.qr(out)  # re-orthonormalise (rounding)
    return q[:, : out.shape[1]].to(inputs.dtype)


class LoRAQKV(nn.Module):
    """``base`` (a frozen Linear) + B A x, with A a fixed buffer and B trained; keeps the inputs it sees while
    ``recording``."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", torch.zeros(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.register_buffer("subspace", torch.zeros(base.in_features, 0))
        self.recording: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recording is not None:
            self.recording.append(x.detach().reshape(-1, x.shape[-1]).cpu())
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + B A; B ← 0."""
        self.base.weight += self.lora_b @ self.lora_a
        self.lora_b.zero_()


class InfLoRANet(PromptedViT):
    """Frozen ViT whose qkv projections are :class:`LoRAQKV` + the suite's heads."""

    def __init__(self, backbone, heads, options: InfLoRAOptions):
        super().__init__(backbone, heads, "inflora")
        self.options = options
        for block in self.blocks:
            block.attn.qkv = LoRAQKV(block.attn.qkv, options.rank)

    @property
    def adapters(self) -> list[LoRAQKV]:
        return [block.attn.qkv for block in self.blocks]

    def prompted_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @torch.no_grad()
    def layer_inputs(self, dataset, batch_size: int, device) -> list[torch.Tensor]:
        """Each adapter's input tokens over the first ``max_examples`` images of ``dataset`` (eval mode)."""
        was_training = self.training
        self.eval()
        for adapter in self.adapters:
            adapter.recording = []
        seen = 0
        try:
            for batch in torch.utils.data.DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False):
                x = batch[0][: self.options.max_examples - seen].to(device)
                self.backbone(x)
                seen += len(x)
                if seen >= self.options.max_examples:
                    break
            return [torch.cat(adapter.recording) for adapter in self.adapters]
        finally:
            for adapter in self.adapters:
                adapter.recording = None
            self.train(was_training)


class InfLoRA(PromptStrategy):
    """Designs A before each experience and merges + grows the subspace after it (see the module docstring)."""

    def _before_training_exp(self, **kwargs):
        super()._before_training_exp(**kwargs)
        net = self.model
        for adapter, h in zip(net.adapters, net.layer_inputs(self.experience.dataset, self.eval_mb_size, self.device)):
            a = orthogonal_design(h, adapter.subspace.cpu(), net.options.rank)
            adapter.lora_a.copy_(a.to(adapter.lora_a.device))
            with torch.no_grad():
                adapter.lora_b.zero_()
            self.optimizer.state.pop(adapter.lora_b, None)  # B starts afresh: no moments of the last experience

    def _after_training_exp(self, **kwargs):
        net = self.model
        for adapter in net.adapters:
            adapter.merge()
        for adapter, h in zip(net.adapters, net.layer_inputs(self.experience.dataset, self.eval_mb_size, self.device)):
            grown = grow_subspace(h, adapter.subspace.cpu(), net.options.threshold)
            adapter.subspace = grown.to(adapter.lora_a.device)
        super()._after_training_exp(**kwargs)


@STRATEGIES.register("inflora", InfLoRAOptions)
def inflora(
    model, options: InfLoRAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """InfLoRA on a ViT: LoRA on qkv with A orthogonal to past tasks' input subspace, B trained, merged per task."""
    net = InfLoRANet(model.backbone, model.heads, options)
    strategy = InfLoRA(**prompt_template_kwargs(net, train, evaluator, device, plugins))
    strategy.mask_past_logits = options.mask_past_logits
    return strategy
