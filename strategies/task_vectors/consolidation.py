"""Task pre-consolidation of class-incremental heads on frozen pre-trained features.

Before the backbone is tuned on a new experience, the new head is linearly probed on θ0 features (so that
θ0 is close to a minimiser of the new task's loss, as the second-order analysis assumes), and all heads are
re-aligned on synthetic features sampled from per-class Gaussian statistics of θ0 features (classifier
alignment, as in SLCA). The result is an *anchor* copy of the heads: it defines the softmax under which the
Fisher is computed and the target of the head regulariser; the trained heads are not overwritten by it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clcompose.strategies.core.heads import ExperienceHeads


class ClassGaussians:
    """Per-class feature statistics: a diagonal Gaussian, or a diagonal Gaussian mixture (sklearn) per class."""

    def __init__(self, components: int = 1, min_var: float = 1e-4):
        self.components = components
        self.min_var = min_var
        self.params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # class → (weights, means, vars)

    @property
    def classes(self) -> list[int]:
        return sorted(self.params)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> None:
        for c in labels.unique().tolist():
            f = features[labels == c].double()
            k = min(self.components, len(f))
            if k <= 1:
                var = f.var(dim=0, unbiased=False) if len(f) > 1 else torch.zeros_like(f[0])
                self.params[c] = (
                    torch.ones(1),
                    f.mean(0, keepdim=True).float(),
                    var.clamp_min(self.min_var)[None].float(),
                )
            else:
                from sklearn.mixture import GaussianMixture

                gm = GaussianMixture(
                    k, covariance_type="diag", max_iter=500, random_state=seed, reg_covar=self.min_var
                ).fit(f.numpy())
                self.params[c] = (
                    torch.from_numpy(gm.weights_).float(),
                    torch.from_numpy(gm.means_).float(),
                    torch.from_numpy(gm.covariances_).float(),
                )

    def sample(
        self, classes: Sequence[int], per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for c in classes:
            w, mu, var = self.params[c]
            comp = torch.multinomial(w, per_class, replacement=True, generator=generator)
            noise = torch.randn(per_class, mu.shape[1], generator=generator)
            xs.append(mu[comp] + noise * var[comp].sqrt())
            ys.append(torch.full((per_class,), c, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return {"components": self.components, "min_var": self.min_var, "params": self.params}

    def load_state_dict(self, state: dict) -> None:
        self.components, self.min_var, self.params = state["components"], state["min_var"], state["params"]


def _cosine_factor(epoch: int, epochs: int) -> float:
    import math

    return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def _positions(classes: Sequence[int], labels: torch.Tensor) -> torch.Tensor:
    """Column of each label in ``classes`` order (the order in which head outputs are concatenated)."""
    lookup = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
    return lookup[labels]


def linear_probe(
    heads: ExperienceHeads,
    head_index: int,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Train head ``head_index`` alone on frozen features with CE over its own classes (past logits masked
    out, i.e. simply not computed); SGD with momentum 0.9."""
    head = heads.heads[head_index]
    targets = _positions(heads.head_classes[head_index], labels)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(head(features[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def align_classifier(
    heads: ExperienceHeads,
    stats: ClassGaussians,
    epochs: int,
    lr: float,
    per_class: int,
    temperature: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Classifier alignment: train all heads on features sampled from every seen class's Gaussian,
    CE on L2-normalised logits (over all seen classes) divided by ``temperature``; SGD with momentum and
    cosine annealing, fresh samples every epoch."""
    seen = heads.seen_classes
    classes = [c for c in seen if c in stats.params]
    if not classes or epochs <= 0:
        return
    opt = torch.optim.SGD(list(heads.parameters()), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine_factor(epoch, epochs)
        x, y = stats.sample(classes, per_class, generator)
        targets = _positions(seen, y)
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            # one matmul over the stacked heads; columns in `seen` order
            weight = torch.cat([h.weight for h in heads.heads])
            bias = torch.cat([h.bias for h in heads.heads])
            logits = F.linear(x[idx], weight, bias)
            loss = F.cross_entropy(F.normalize(logits, dim=1) / temperature, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def anchor_heads(
    heads: ExperienceHeads,
    stats: ClassGaussians,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    probe_epochs: int,
    probe_lr: float,
    probe_batch_size: int,
    align_epochs: int,
    align_lr: float,
    align_per_class: int,
    align_temperature: float,
    batch_size: int,
    generator: torch.Generator,
) -> ExperienceHeads:
    """The pre-consolidated copy of ``heads``: new head probed on θ0 features, then all heads aligned."""
    anchor = copy.deepcopy(heads)
    for p in anchor.parameters():
        p.requires_grad_(False)
    last = len(anchor.heads) - 1
    for p in anchor.heads[last].parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        linear_probe(anchor, last, features, labels, probe_epochs, probe_lr, probe_batch_size, generator)
        for p in anchor.parameters():
            p.requires_grad_(True)
        align_classifier(
            anchor, stats, align_epochs, align_lr, align_per_class, align_temperature, batch_size, generator
        )
    for p in anchor.parameters():
        p.requires_grad_(False)
    return anchor
