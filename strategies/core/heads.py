"""Class-incremental classifiers: one linear head per experience, logits laid out in label space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from avalanche.models import DynamicModule
from torch import nn

MASK_VALUE = -1e4  # logit of a class no head covers yet: finite, so log-softmax and its gradient stay finite


class ExperienceHeads(DynamicModule):
    """A growing classifier made of one ``Linear(in_features, n_new)`` per training experience.

    The output has one column per class label (``max label + 1`` columns); columns of classes that no head
    covers hold :data:`MASK_VALUE`. A head is added, in training mode only, for the classes of an experience
    that no existing head covers; in eval mode adaptation only widens the output (masked columns) so that
    future classes can be scored (as wrong) without an index error. New heads are initialised trunc-normal (σ = 0.02) with zero bias.
    """

    def __init__(self, in_features: int, freeze_old: bool = False):
        super().__init__()
        self.in_features = in_features
        self.freeze_old = freeze_old
        self.heads = nn.ModuleList()
        self.head_classes: list[list[int]] = []
        self.min_outputs = 0

    @property
    def seen_classes(self) -> list[int]:
        return [c for cls in self.head_classes for c in cls]

    @property
    def num_outputs(self) -> int:
        return max(max(self.seen_classes, default=-1) + 1, self.min_outputs)

    def add_head(self, classes: Sequence[int], generator: torch.Generator | None = None) -> nn.Linear:
        """Append a head for ``classes`` (in this column order) and return it; its init draws from
        ``generator`` when given (else from the global random stream)."""
        classes = [int(c) for c in classes]
        overlap = set(classes) & set(self.seen_classes)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} already have a head")
        head = nn.Linear(self.in_features, len(classes))
        nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
        if self.heads:
            head.to(next(self.heads.parameters()).device)
        if self.freeze_old:
            for p in self.heads.parameters():
                p.requires_grad_(False)
        self.heads.append(head)
        self.head_classes.append(classes)
        return head

    @torch.no_grad()
    def adaptation(self, experience) -> None:
        classes = {int(c) for c in experience.classes_in_this_experience}
        if not self.training:
            self.min_outputs = max(self.min_outputs, max(classes, default=-1) + 1)
            return
        new = sorted(classes - set(self.seen_classes))
        if new:
            self.add_head(new)

    def class_index(self, device=None) -> torch.Tensor:
        return torch.tensor(self.seen_classes, dtype=torch.long, device=device)

    def assemble(self, per_head: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scatter per-head logits (concatenated in head order) into label-space columns."""
        cat = torch.cat(list(per_head), dim=1)
        out = cat.new_full((cat.shape[0], self.num_outputs), MASK_VALUE)
        out[:, self.class_index(cat.device)] = cat
        return out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.heads:
            raise RuntimeError("ExperienceHeads has no head yet: adapt it to an experience first")
        return self.assemble([h(features) for h in self.heads])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, head_classes={self.head_classes}"

    def get_extra_state(self):
        return {"head_classes": self.head_classes, "min_outputs": self.min_outputs}

    def set_extra_state(self, state) -> None:
        self.head_classes = [list(c) for c in state["head_classes"]]
        self.min_outputs = int(state["min_outputs"])
        while len(self.heads) < len(self.head_classes):
            self.heads.append(nn.Linear(self.in_features, len(self.head_classes[len(self.heads)])))


class ClassIncrementalNet(nn.Module):
    """``backbone`` (input → feature vector of size ``backbone.out_features``) followed by :class:`ExperienceHeads`."""

    def __init__(self, backbone: nn.Module, out_features: int | None = None, freeze_old_heads: bool = False):
        super().__init__()
        self.backbone = backbone
        dim = out_features if out_features is not None else backbone.out_features
        self.heads = ExperienceHeads(dim, freeze_old=freeze_old_heads)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.backbone(x))


def mask_to_classes(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Keep the logits of ``classes`` and set all other columns to :data:`MASK_VALUE` (masked cross-entropy)."""
    keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, MASK_VALUE)
