"""The pieces the ViT methods (L2P, CODA-Prompt, InfLoRA) put into a timm Vision Transformer, and their
shared strategy.

The suite's ViT backbone keeps its own forward (input transform, timm's ``forward_features`` and pooling); the
methods only swap three kinds of submodule, each a thin wrapper that behaves exactly as the module it wraps
until it is given something for the current forward:

- :class:`PromptSlot` replaces ``norm_pre`` (right after the position embedding): prompt tokens inserted
  after the [CLS] token (prompt tuning, L2P);
- :class:`PrefixAttention` replaces a block's ``attn``: prefix keys and values prepended to the keys and
  values of self-attention (prefix tuning, CODA-Prompt);
- :class:`TokenTap` replaces the final ``norm`` and keeps its output tokens (L2P pools over its prompts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from clcompose.strategies.core.heads import ExperienceHeads, mask_to_classes
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.core.training import template_kwargs


def find_vit(backbone: nn.Module, strategy: str) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``backbone`` (itself, or its ``net``); one-line ConfigError if none."""
    for candidate in (backbone, getattr(backbone, "net", None)):
        if candidate is not None and all(hasattr(candidate, a) for a in ("patch_embed", "blocks", "norm_pre", "norm")):
            return candidate
    raise ConfigError(
        f"strategy {strategy} needs a Vision Transformer backbone (vit-b16), got {type(backbone).__name__}"
    )


class PromptSlot(nn.Module):
    """``inner`` (timm's ``norm_pre``), then ``pending`` prompt tokens [B, L, D] inserted after the [CLS] token."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inner(x)
        if self.pending is None:
            return x
        return torch.cat([x[:, :1], self.pending.to(x.dtype), x[:, 1:]], dim=1)


class TokenTap(nn.Module):
    """``inner`` (timm's final ``norm``), keeping its output tokens in ``tokens`` for the current forward."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tokens = self.inner(x)
        return self.tokens


def prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor | None, pv: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q [pk; k]ᵀ · scale) [pv; v] per head; q, k, v: [B, H, N, d], pk, pv: [B, H, L, d]."""
    if pk is not None:
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


class PrefixAttention(nn.Module):
    """timm's ``Attention`` with optional prefix keys/values ``pending = (pk, pv)``, each [B, L, D] (split into
    heads as timm splits k and v), prepended after the qkv projection (as in DualPrompt and CODA-Prompt)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if self.pending is None:
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)
        a = self.attn
        if getattr(a, "gate", None) is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("prefix attention with gates or attention masks")
        B, N, _ = x.shape
        qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        pk, pv = (p.reshape(B, -1, a.num_heads, a.head_dim).transpose(1, 2) for p in self.pending)
        out = prefix_attention(q, k, v, pk, pv, a.scale)
        out = a.norm(out.transpose(1, 2).reshape(B, N, -1))
        return a.proj_drop(a.proj(out))


class PromptedViT(nn.Module):
    """A frozen ViT ``backbone`` + trainable prompt modules + the suite's :class:`ExperienceHeads`.

    Subclasses implement :meth:`prompted_features` (features of one batch with their prompts) and may leave a
    training penalty in ``extra_loss`` (added to the strategy's loss). ``query(x)``: the frozen ViT's [CLS]
    features without prompts, the query of prompt selection in L2P and CODA-Prompt."""

    def __init__(self, backbone: nn.Module, heads: ExperienceHeads, strategy: str):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        vit = find_vit(backbone, strategy)
        for p in backbone.parameters():
            p.requires_grad_(False)
        vit.norm_pre = PromptSlot(vit.norm_pre)
        vit.norm = TokenTap(vit.norm)
        self.strategy_name = strategy
        self.extra_loss: torch.Tensor | None = None

    @property
    def vit(self) -> nn.Module:
        return find_vit(self.backbone, self.strategy_name)

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def run_backbone(self, x, tokens=None, prefixes: dict | None = None) -> torch.Tensor:
        """The backbone's forward with prompt ``tokens`` [B, L, D] and ``prefixes`` {block: (pk, pv)}."""
        vit = self.vit
        vit.norm_pre.pending = tokens
        for i, pk_pv in (prefixes or {}).items():
            vit.blocks[i].attn.pending = pk_pv
        try:
            return self.backbone(x)
        finally:
            vit.norm_pre.pending = None
            for i in prefixes or {}:
                vit.blocks[i].attn.pending = None

    def prompted_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompted_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.prompted_features(x))


def wrap_attention(model: PromptedViT, layers: list[int]) -> None:
    """Swap the ``attn`` of each block in ``layers`` for a :class:`PrefixAttention`."""
    for i in layers:
        if not isinstance(model.blocks[i].attn, PrefixAttention):
            model.blocks[i].attn = PrefixAttention(model.blocks[i].attn)


def check_layers(layers: list[int], depth: int, where: str) -> list[int]:
    """Validate block indices against the ViT's depth (ConfigError naming ``where``)."""
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"{where}: blocks {bad} do not exist in a ViT of depth {depth}")
    return sorted(set(layers))


def prompt_template_kwargs(net: PromptedViT, train, evaluator, device, plugins) -> dict:
    """The suite's template keywords for a prompted ViT. Its optimiser starts over every parameter, frozen ones
    included (they have no gradient, so no step moves them): before the first experience the model may have no
    trainable parameter yet (prompts and heads are added by adaptation), and Avalanche's optimiser update puts
    every parameter in anyway."""
    frozen = [p for p in net.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        kwargs = template_kwargs(net, train, evaluator, device, plugins)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return kwargs


class PromptStrategy(SupervisedTemplate):
    """Avalanche's template on a :class:`PromptedViT`: CE (past logits masked while training when
    ``mask_past_logits``, as L2P and CODA-Prompt train on the current classes) + the model's ``extra_loss``.

    The optimiser starts afresh at every experience, as the L2P, CODA-Prompt and InfLoRA codes create a new one
    per task (Avalanche keeps the state across experiences by default: Adam's momentum would then keep moving
    the past experiences' heads and prompts after their gradient is masked to zero)."""

    mask_past_logits: bool = True

    def check_model_and_optimizer(self, reset_optimizer_state=False, **kwargs):
        super().check_model_and_optimizer(reset_optimizer_state=True, **kwargs)

    def criterion(self):
        logits = self.mb_output
        if self.is_training and self.mask_past_logits:
            logits = mask_to_classes(logits, self.experience.classes_in_this_experience)
        loss = F.cross_entropy(logits, self.mb_y)
        if self.is_training and self.model.extra_loss is not None:
            loss = loss + self.model.extra_loss
        return loss
