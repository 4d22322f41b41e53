"""L2P (Wang et al., CVPR 2022, "Learning to Prompt for Continual Learning") on the suite's ViT and heads.

A pool of M prompts P_m ∈ R^{L×D} with keys k_m ∈ R^D (Avalanche's :class:`avalanche.models.prompt.Prompt`).
The query q(x) is the frozen ViT's [CLS] feature of x without prompts; the N prompts whose keys are most similar
(cos(q, k_m)) are inserted after the [CLS] token; the feature is the mean of the N·L prompt tokens' outputs
(``pool: prompt``, L2P's prompt head) or the [CLS] output (``pool: cls``). The loss is CE on the current
classes' logits (``mask_past_logits``) minus the pull constraint λ · (1/B) Σ_i Σ_{m ∈ top-N(x_i)} cos(q(x_i), k_m).

Why not Avalanche's ``LearningToPrompt`` strategy: it builds its own ViT by name from the hub (no local weights
file, so it cannot run on an offline node, nor on the suite's ``vit-b16`` backbone and its ``checkpoint``), and
it replaces the classifier with a fixed ``Linear(768, num_classes)`` (no growing heads, ViT-B only). Its prompt
pool is used here unchanged. Differences from the paper: prompts are inserted after the position embedding
(they get none), and the optional task-specific prompt masks of L2P's training are not implemented.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from avalanche.models.prompt import Prompt

from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.prompts.vit import PromptedViT, PromptStrategy, prompt_template_kwargs


@dataclasses.dataclass
class L2POptions(Options):
    """L2P: a pool of ``pool_size`` prompts of ``prompt_length`` tokens; the ``top_k`` best-matching are used."""

    pool_size: int = 10
    prompt_length: int = 5
    top_k: int = 5
    pull_constraint: float = 0.1  # λ of the key–query pull term
    pool: Literal["prompt", "cls"] = "prompt"
    batchwise_prompt: bool = False  # the batch's N most frequent prompts for every example (L2P at test time)
    mask_past_logits: bool = True

    def check(self) -> None:
        self.require(self.pool_size >= 1, "pool_size", "must be >= 1")
        self.require(self.prompt_length >= 1, "prompt_length", "must be >= 1")
        self.require(1 <= self.top_k <= self.pool_size, "top_k", f"must be in [1, pool_size={self.pool_size}]")
        self.require(self.pull_constraint >= 0, "pull_constraint", "must be >= 0")


class L2PNet(PromptedViT):
    """Frozen ViT + Avalanche's prompt pool + the suite's heads (see the module docstring)."""

    def __init__(self, backbone, heads, options: L2POptions):
        super().__init__(backbone, heads, "l2p")
        self.options = options
        dim = backbone.out_features
        self.prompt = Prompt(
            length=options.prompt_length,
            embed_dim=dim,
            embedding_key="cls",
            prompt_init="uniform",
            prompt_pool=True,
            prompt_key=True,
            pool_size=options.pool_size,
            top_k=options.top_k,
            batchwise_prompt=options.batchwise_prompt,
            prompt_key_init="uniform",
        )
        self.last_selection: torch.Tensor | None = None

    def select(self, q: torch.Tensor) -> dict:
        """Avalanche's pool: the top-N prompts for queries ``q`` [B, D] ("prompt_idx", "reduce_sim", tokens)."""
        out = self.prompt(q[:, None, :], cls_features=q)
        out["tokens"] = out["prompted_embedding"][:, :-1]
        return out

    def prompted_features(self, x: torch.Tensor) -> torch.Tensor:
        chosen = self.select(self.query(x))
        self.last_selection = chosen["prompt_idx"].detach()
        self.extra_loss = -self.options.pull_constraint * chosen["reduce_sim"]
        cls = self.run_backbone(x, tokens=chosen["tokens"])
        if self.options.pool == "cls":
            return cls
        n = chosen["tokens"].shape[1]
        return self.vit.norm.tokens[:, 1 : 1 + n].mean(dim=1)


@STRATEGIES.register("l2p", L2POptions)
def l2p(model, options: L2POptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """L2P on a ViT: prompt pool with key–query matching, top-N prompts inserted, pull constraint (Avalanche's pool)."""
    net = L2PNet(model.backbone, model.heads, options)
    strategy = PromptStrategy(**prompt_template_kwargs(net, train, evaluator, device, plugins))
    strategy.mask_past_logits = options.mask_past_logits
    return strategy
