"""Task pre-consolidation of class-incremental heads on frozen pre-trained features.

Before the backbone is tuned on a new experience, the new head is linearly probed on θ0 features (so that
θ0 is close to a minimiser of the new task's loss, as the second-order analysis assumes), and all heads are
re-aligned on synthetic features sampled from per-class Gaussian statistics of θ0 features (classifier
alignment, as in SLCA). The result is an *anchor* copy of the heads: it defines the softmax under which the
Fisher is computed and the target of the head regulariser; the trained heads are not overwritten by it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clcompose.strategies.core.heads import ExperienceHeads
from clcompose.strategies.task_vectors.gmm import fit_reference_gmm


class ClassGaussians:
    """Per-class feature statistics: a diagonal Gaussian, or a diagonal Gaussian mixture per class, fitted by
    sklearn (``fit="sklearn"``, variances floored at ``min_var``) or as the reference code does
    (``fit="reference"``, :func:`~clcompose.strategies.task_vectors.gmm.fit_reference_gmm`)."""

    def __init__(self, components: int = 1, min_var: float = 1e-4, fit: str = "sklearn", iterations: int = 500):
        self.components = components
        self.min_var = min_var
        self.fit_method = fit
        self.iterations = iterations
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
            elif self.fit_method == "reference":
                gen = torch.Generator().manual_seed(seed + c)
                self.params[c] = fit_reference_gmm(f, k, gen, n_iter=self.iterations)
            else:
                from sklearn.mixture import GaussianMixture

                gm = GaussianMixture(
                    k, covariance_type="diag", max_iter=self.iterations, random_state=seed, reg_covar=self.min_var
                ).fit(f.numpy())
                self.params[c] = (
                    torch.from_numpy(gm.weights_).float(),
                    torch.from_numpy(gm.means_).float(),
                    torch.from_numpy(gm.covariances_).float(),
                )

    def sample(
        self, classes: Sequence[int], per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.params[classes[0]][1].shape[1] if classes else 0
        xs = torch.empty(len(classes) * per_class, dim)
        for i, c in enumerate(classes):
            w, mu, var = self.params[c]
            comp = torch.multinomial(w, per_class, replacement=True, generator=generator)
            noise = torch.randn(per_class, dim, generator=generator)
            std = var.sqrt()
            if len(w) > 1:  # each row its component's mean and std (one component: broadcast, no gather)
                mu, std = mu[comp], std[comp]
            rows = xs[i * per_class : (i + 1) * per_class]
            torch.mul(noise, std, out=rows).add_(mu)  # μ + noise · σ, rounded as written (addcmul fuses)
        return xs, torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)

    def state_dict(self) -> dict:
        return {
            "components": self.components,
            "min_var": self.min_var,
            "fit": self.fit_method,
            "iterations": self.iterations,
            "params": self.params,
        }

    def load_state_dict(self, state: dict) -> None:
        self.components, self.min_var, self.params = state["components"], state["min_var"], state["params"]
        self.fit_method, self.iterations = state.get("fit", "sklearn"), state.get("iterations", 500)


def _cosine_factor(epoch: int, epochs: int) -> float:
    """CosineAnnealingLR's factor at ``epoch`` of ``epochs`` (η_min = 0): ½ (1 + cos(π e / E))."""
    return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))


def _batches(order: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    """Consecutive index batches of ``order``; ``drop_last`` drops a final incomplete one (as the reference's
    DataLoader(drop_last=True) does: a set smaller than one batch then takes no step)."""
    n = len(order) - (len(order) % batch_size if drop_last else 0)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def normalized_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / (τ (‖logits‖ + 1e-7)), the reference's alignment normalisation (all logits of a row)."""
    return logits / (temperature * (logits.norm(dim=-1, keepdim=True) + 1e-7))


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
    momentum: float = 0.9,
    drop_last: bool = False,
    features_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Train head ``head_index`` alone on frozen features with CE over its own classes (past logits masked
    out, i.e. simply not computed; the same as CE over all seen classes with the past logits at −inf);
    SGD (``momentum``; 0 = the reference's plain SGD), a fresh shuffle every epoch.

    ``features_fn`` (when the training data are augmented): returns fresh (features, labels) for every epoch,
    as the reference recomputes θ0 features of the augmented training set each probing epoch."""
    head = heads.heads[head_index]
    classes = heads.head_classes[head_index]
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    for epoch in range(epochs):
        if features_fn is not None and epoch > 0:
            features, labels = features_fn()
        targets = _positions(classes, labels)
        order = torch.randperm(len(labels), generator=generator)
        for idx in _batches(order, batch_size, drop_last):
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
    momentum: float = 0.9,
    drop_last: bool = False,
) -> None:
    """Classifier alignment: train all heads on features sampled from every seen class's statistics,
    CE on L2-normalised logits (over all seen classes) divided by ``temperature`` (:func:`normalized_logits`);
    SGD (``momentum``; 0 = the reference's plain SGD) with cosine annealing per epoch, fresh samples every
    epoch."""
    seen = heads.seen_classes
    classes = [c for c in seen if c in stats.params]
    if not classes or epochs <= 0:
        return
    stacked = _StackedHeads(heads)
    opt = torch.optim.SGD([stacked.weight, stacked.bias], lr=lr, momentum=momentum)
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine_factor(epoch, epochs)
        x, y = stats.sample(classes, per_class, generator)  # drawn on the CPU, with the CPU generator
        x, targets = x.to(stacked.weight.device), _positions(seen, y).to(stacked.weight.device)  # to the heads
        order = torch.randperm(len(y), generator=generator)
        for idx in _batches(order, batch_size, drop_last):
            logits = F.linear(x[idx], stacked.weight, stacked.bias)  # columns in `seen` order
            loss = F.cross_entropy(normalized_logits(logits, temperature), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    stacked.write_back()


class _StackedHeads:
    """Every head's weight and bias as one stacked leaf each, trained in place of the heads and written back.

    F.linear of the stacks is the concatenated heads' logits and SGD is elementwise, so this is the same
    arithmetic as training the heads one by one, bit for bit, without concatenating them and splitting their
    gradients at every step (about a third of a step's time). A parameter that does not require grad has its
    rows' gradient zeroed: its momentum stays 0 and it never moves, as SGD skipping it would leave it."""

    def __init__(self, heads: ExperienceHeads):
        self.heads = list(heads.heads)
        self.weight = self._stack([h.weight for h in self.heads])
        self.bias = self._stack([h.bias for h in self.heads])

    @staticmethod
    def _stack(params: list[torch.Tensor]) -> torch.Tensor:
        leaf = torch.cat([p.detach() for p in params]).requires_grad_(True)
        if not all(p.requires_grad for p in params):
            mask = torch.cat([torch.full_like(p, float(p.requires_grad)) for p in params])
            leaf.register_hook(lambda grad: grad * mask)
        return leaf

    @torch.no_grad()
    def write_back(self) -> None:
        row = 0
        for h in self.heads:
            n = h.out_features
            h.weight.copy_(self.weight[row : row + n])
            h.bias.copy_(self.bias[row : row + n])
            row += n


def anchor_heads(
    heads: ExperienceHeads,
    stats: ClassGaussians,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    probe: dict,
    align: dict,
    generator: torch.Generator,
    features_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> ExperienceHeads:
    """The pre-consolidated copy of ``heads``: the new (last) head probed on θ0 features
    (:func:`linear_probe` with the keywords ``probe``), then all heads aligned (:func:`align_classifier` with
    ``align``)."""
    anchor = copy.deepcopy(heads)
    for p in anchor.parameters():
        p.requires_grad_(False)
    last = len(anchor.heads) - 1
    for p in anchor.heads[last].parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        linear_probe(anchor, last, features, labels, generator=generator, features_fn=features_fn, **probe)
        for p in anchor.parameters():
            p.requires_grad_(True)
        align_classifier(anchor, stats, generator=generator, **align)
    for p in anchor.parameters():
        p.requires_grad_(False)
    return anchor


def has_train_augmentation(dataset) -> bool:
    """Whether an Avalanche dataset's training transform differs from its evaluation transform (then its θ0
    features differ per pass, and the probe recomputes them every epoch). The suite's benchmarks have none."""
    stack = [getattr(dataset, "_flat_data", None)]
    while stack:
        data = stack.pop()
        if data is None:
            continue
        for attr in ("_transform_groups", "_frozen_transform_groups"):
            groups = getattr(getattr(data, attr, None), "transform_groups", {}) or {}
            train = groups.get("train")
            if train is not None and train is not groups.get("eval") and train != groups.get("eval"):
                return True
        stack.extend(d for d in getattr(data, "_datasets", []) if hasattr(d, "_transform_groups"))
    return False
