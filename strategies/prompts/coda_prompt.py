"""CODA-Prompt (Smith et al., CVPR 2023, "COntinual Decomposed Attention-based Prompting") on the suite's ViT.

In every prompted block l, components P_m ∈ R^{L×D} with keys K_m ∈ R^D and attention vectors A_m ∈ R^D. For
the frozen ViT's [CLS] query q(x) (no prompts), the weights and the prompt are

    α_m(x) = cos(q ⊙ A_m, K_m) = ⟨q ⊙ A_m, K_m⟩ / (‖q ⊙ A_m‖ ‖K_m‖),      p(x) = Σ_m α_m(x) P_m,

and p = [p_k; p_v] (L/2 tokens each) is prepended to the keys and values of the block's self-attention
(prefix tuning, :class:`~clcompose.strategies.prompts.vit.PrefixAttention`). Experience t adds
``components_per_task`` components per block, initialised orthogonal (Gram–Schmidt) to all earlier ones; the
components of earlier experiences are frozen; the components of later experiences do not exist yet. Optional
orthogonality penalty μ Σ_l (‖K Kᵀ − I‖² + ‖A Aᵀ − I‖² + ‖P Pᵀ − I‖²) (P flattened per component).
Loss: CE on the current classes' logits + the penalty.

Differences from the paper's code: components are added per experience as they come (the paper's code
allocates M/T per task up front, knowing T); the pool grows by the same amount per experience.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from avalanche.models import DynamicModule
from torch import nn

from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.prompts.vit import (
    PromptedViT,
    PromptStrategy,
    check_layers,
    prompt_template_kwargs,
    wrap_attention,
)


@dataclasses.dataclass
class CODAPromptOptions(Options):
    """CODA-Prompt: attention-weighted prompt components, ``components_per_task`` per experience and block."""

    components_per_task: int = 10  # the paper: 100 components over 10 tasks
    prompt_length: int = 8  # L: L/2 prefix keys + L/2 prefix values
    layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2, 3, 4])  # clipped to the ViT's depth
    ortho_mu: float = 0.0
    mask_past_logits: bool = True

    def check(self) -> None:
        self.require(self.components_per_task >= 1, "components_per_task", "must be >= 1")
        self.require(
            self.prompt_length >= 2 and self.prompt_length % 2 == 0, "prompt_length", "must be an even number >= 2"
        )
        self.require(len(self.layers) >= 1 and min(self.layers) >= 0, "layers", "must be block indices >= 0")
        self.require(self.ortho_mu >= 0, "ortho_mu", "must be >= 0")


def gram_schmidt_rows(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``new`` made orthonormal to each other and to the rows of ``old`` (assumed orthonormal),
    by classical Gram–Schmidt in order; the paper's initialisation (needs rows ≤ columns)."""
    basis = [] if old is None else list(old.detach())
    out = []
    for v in new:
        for b in basis:
            v = v - (v @ b) * b
        v = v / v.norm().clamp_min(1e-12)
        basis.append(v)
        out.append(v)
    return torch.stack(out)


def coda_weights(q: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """α[b, m] = cos(q_b ⊙ A_m, K_m) for queries [B, D], keys and attention vectors [M, D]."""
    aq = q[:, None, :] * attention[None]  # [B, M, D]
    return torch.einsum("bmd,md->bm", F.normalize(aq, dim=2), F.normalize(keys, dim=1))


class CODAPool(DynamicModule):
    """The components of one prompted block: per experience a chunk (P [n, L, D], K [n, D], A [n, D])."""

    def __init__(self, dim: int, length: int, per_task: int):
        super().__init__()
        self.dim, self.length, self.per_task = dim, length, per_task
        self.prompts, self.keys, self.attention = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.tasks: list[int] = []

    def add_chunk(self) -> None:
        """Freeze every existing chunk; append one initialised orthogonal to them (uniform, then Gram–Schmidt)."""
        for p in self.parameters():
            p.requires_grad_(False)
        n, d, length = self.per_task, self.dim, self.length
        old = self.stacked()
        device = old[1].device if old[1] is not None else None
        flat_old = old[0].reshape(old[0].shape[0], -1) if old[0] is not None else None

        def make(*shape):
            return torch.rand(*shape, device=device) * 2 - 1

        p = gram_schmidt_rows(make(n, length * d), flat_old).reshape(n, length, d)
        k = gram_schmidt_rows(make(n, d), old[1]) if (old[1] is None or old[1].shape[0] + n <= d) else make(n, d)
        a = gram_schmidt_rows(make(n, d), old[2]) if (old[2] is None or old[2].shape[0] + n <= d) else make(n, d)
        self.prompts.append(nn.Parameter(p))
        self.keys.append(nn.Parameter(k))
        self.attention.append(nn.Parameter(a))

    def stacked(self):
        """(P [M, L, D], K [M, D], A [M, D]) over all chunks, or Nones before the first experience."""
        if len(self.prompts) == 0:
            return None, None, None
        return torch.cat(list(self.prompts)), torch.cat(list(self.keys)), torch.cat(list(self.attention))

    @torch.no_grad()
    def adaptation(self, experience) -> None:
        if self.training and experience.current_experience not in self.tasks:
            self.tasks.append(int(experience.current_experience))
            self.add_chunk()

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α [B, M], p_k [B, L/2, D], p_v [B, L/2, D]) for queries ``q``."""
        prompts, keys, attention = self.stacked()
        alpha = coda_weights(q, keys, attention)
        p = torch.einsum("bm,mld->bld", alpha, prompts)
        half = self.length // 2
        return alpha, p[:, :half], p[:, half:]

    def ortho_penalty(self) -> torch.Tensor:
        prompts, keys, attention = self.stacked()
        total = 0.0
        for mat in (keys, attention, prompts.reshape(prompts.shape[0], -1)):
            gram = mat @ mat.T
            total = total + (gram - torch.eye(len(mat), device=mat.device)).pow(2).sum()
        return total


class CODANet(PromptedViT):
    """Frozen ViT with a :class:`CODAPool` per prompted block (prefix tuning) + the suite's heads."""

    def __init__(self, backbone, heads, options: CODAPromptOptions):
        super().__init__(backbone, heads, "coda-prompt")
        self.options = options
        depth = len(self.blocks)
        self.layers = check_layers([i for i in options.layers if i < depth] or [0], depth, "CODAPromptOptions.layers")
        wrap_attention(self, self.layers)
        dim = backbone.out_features
        self.pools = nn.ModuleDict(
            {str(i): CODAPool(dim, options.prompt_length, options.components_per_task) for i in self.layers}
        )

    def prompted_features(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(x)
        prefixes = {}
        for i in self.layers:
            _, pk, pv = self.pools[str(i)](q)
            prefixes[i] = (pk, pv)
        mu = self.options.ortho_mu
        self.extra_loss = mu * sum(pool.ortho_penalty() for pool in self.pools.values()) if mu > 0 else None
        return self.run_backbone(x, prefixes=prefixes)


@STRATEGIES.register("coda-prompt", CODAPromptOptions)
def coda_prompt(
    model, options: CODAPromptOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """CODA-Prompt on a ViT: prompt components weighted by cos(q ⊙ A, K), prefix-tuned into attention, past frozen."""
    net = CODANet(model.backbone, model.heads, options)
    strategy = PromptStrategy(**prompt_template_kwargs(net, train, evaluator, device, plugins))
    strategy.mask_past_logits = options.mask_past_logits
    return strategy
