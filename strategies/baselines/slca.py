"""SLCA (Zhang et al., ICCV 2023, "Slow Learner with Classifier Alignment") on the suite's heads.

Slow learner: one optimiser with two parameter groups, the backbone at ``backbone_lr_scale`` × ``train.lr``
(0.01 by default; SLCA's 1e-4 against 1e-2) and the heads at ``train.lr``. Classifier alignment after each
experience: the features z = f(x) of the experience's training data under the just-trained backbone give
per-class Gaussian statistics N(μ_c, diag σ²_c) for its new classes (statistics of earlier classes are kept as
stored); then every head is re-trained on features sampled from all seen classes' statistics, with CE on the
normalised logits z / (τ ‖z‖) (:func:`~clcompose.strategies.task_vectors.consolidation.align_classifier`).

Differences from the paper, each an option: the statistics are diagonal (``gaussian_components`` > 1 fits a
diagonal mixture) where SLCA stores a full covariance per class; ``backbone_lr_scale: 1`` with alignment is
"naive + classifier alignment" and ``ewc_lambda`` > 0 adds Avalanche's EWC penalty λ Σ F (θ − θ*)², so
"EWC + classifier alignment" is the same strategy; ``align: false`` switches the alignment off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from avalanche.training.plugins import EWCPlugin
from avalanche.training.templates import SupervisedTemplate

from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig, template_kwargs
from clcompose.strategies.task_vectors.consolidation import ClassGaussians, align_classifier


@dataclasses.dataclass
class SLCAOptions(Options):
    """Slow learner (backbone lr = ``backbone_lr_scale`` × head lr) + classifier alignment on class statistics."""

    backbone_lr_scale: float = 0.01
    align: bool = True
    align_epochs: int = 5
    align_lr: float = 0.01
    align_momentum: float = 0.9
    align_per_class: int = 256  # sampled features per class and epoch
    align_batch_size: int = 64
    align_temperature: float = 0.1
    gaussian_components: int = 1
    min_var: float = 1e-4
    align_seed: int = 0  # alignment after experience t samples from a generator seeded align_seed + t
    ewc_lambda: float = 0.0  # > 0 adds Avalanche's EWC penalty (separate mode)

    def check(self) -> None:
        self.require(self.backbone_lr_scale >= 0, "backbone_lr_scale", "must be >= 0")
        self.require(self.align_epochs >= 0, "align_epochs", "must be >= 0")
        self.require(self.align_lr > 0, "align_lr", "must be > 0")
        self.require(0 <= self.align_momentum < 1, "align_momentum", "must be in [0, 1)")
        self.require(self.align_per_class >= 1, "align_per_class", "must be >= 1")
        self.require(self.align_batch_size >= 1, "align_batch_size", "must be >= 1")
        self.require(self.align_temperature > 0, "align_temperature", "must be > 0")
        self.require(self.gaussian_components >= 1, "gaussian_components", "must be >= 1")
        self.require(self.min_var > 0, "min_var", "must be > 0")
        self.require(0 <= self.align_seed < 2**32, "align_seed", "must be in [0, 2**32)")
        self.require(self.ewc_lambda >= 0, "ewc_lambda", "must be >= 0")


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(backbone parameters, head parameters) of a :class:`ClassIncrementalNet`-like model (heads under ``heads.``)."""
    named = list(model.named_parameters())
    return [p for n, p in named if not n.startswith("heads.")], [p for n, p in named if n.startswith("heads.")]


def two_group_optimizer(model: torch.nn.Module, train: TrainConfig, backbone_lr_scale: float) -> torch.optim.Optimizer:
    """``train.optimizer`` with the backbone group at ``backbone_lr_scale · train.lr`` and the heads at ``train.lr``."""
    backbone, heads = split_parameters(model)
    groups = [{"params": backbone, "lr": train.lr * backbone_lr_scale}, {"params": heads, "lr": train.lr}]
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay)


@torch.no_grad()
def experience_features(model, dataset, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of ``dataset`` (its eval transform), the model in eval mode."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in torch.utils.data.DataLoader(dataset.eval(), batch_size=batch_size, shuffle=False):
        feats.append(model.features(batch[0].to(device)).float().cpu())
        labels.append(torch.as_tensor(batch[1]).long())
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


class SLCA(SupervisedTemplate):
    """Slow learner with classifier alignment (see the module docstring). ``stats`` holds the class statistics."""

    def __init__(self, *, options: SLCAOptions, train: TrainConfig, **kwargs):
        self.options = options
        self.stats = ClassGaussians(components=options.gaussian_components, min_var=options.min_var)
        self.aligned_experiences = 0
        super().__init__(**kwargs)

    def make_optimizer(self, **kwargs):
        """Keep the two groups: backbone parameters in group 0, head parameters (new heads too) in group 1."""
        backbone, heads = split_parameters(self.model)
        self.optimizer.param_groups[0]["params"] = backbone
        self.optimizer.param_groups[1]["params"] = heads

    def _after_training_exp(self, **kwargs):
        if self.options.align:
            self.align_heads(self.experience.dataset)
        super()._after_training_exp(**kwargs)

    def align_heads(self, dataset) -> None:
        """Fit the new classes' statistics on this experience's features, then align every head on samples."""
        o = self.options
        features, labels = experience_features(self.model, dataset, self.eval_mb_size, self.device)
        new = ~torch.isin(labels, torch.tensor(self.stats.classes, dtype=torch.long))
        self.stats.fit(features[new], labels[new], seed=o.align_seed)
        generator = torch.Generator().manual_seed(o.align_seed + self.aligned_experiences)
        heads = self.model.heads
        device = next(heads.parameters()).device
        heads.to("cpu")
        with torch.enable_grad():
            align_classifier(
                heads,
                self.stats,
                epochs=o.align_epochs,
                lr=o.align_lr,
                per_class=o.align_per_class,
                temperature=o.align_temperature,
                batch_size=o.align_batch_size,
                generator=generator,
                momentum=o.align_momentum,
            )
        heads.to(device)
        self.aligned_experiences += 1


@STRATEGIES.register("slca", SLCAOptions)
def slca(
    model, options: SLCAOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> SLCA:
    """SLCA: slow backbone lr, full head lr, classifier alignment on per-class feature statistics (+ optional EWC)."""
    plugins = list(plugins or [])
    if options.ewc_lambda > 0:
        plugins.append(EWCPlugin(ewc_lambda=options.ewc_lambda, mode="separate"))
    optimizer = two_group_optimizer(model, train, options.backbone_lr_scale)
    kwargs = template_kwargs(model, train, evaluator, device, plugins, optimizer=optimizer)
    return SLCA(options=options, train=train, **kwargs)
