"""Template-mixture modular networks (Zhmoginov, Bashkirova & Sandler, arXiv 2107.10963).

An *isometric* residual network: a stem maps the image to a C-channel map, then L residual blocks of one
fixed shape, then an output adapter (1×1 conv, global average pool) gives the features. The blocks own no
weights. One global bank holds N *template* blocks, each learnable tensor stored with a leading template
axis, and block ℓ of task t runs with the convex combination

    W_ℓ^(t) = Σ_k softmax(ξ_ℓ^(t))_k · W_k          (every tensor of the block, normalisation γ/β included)

set by the task's mixture logits ξ^(t) ∈ R^{L×N} (its *program*). Normalisation statistics are never mixed:
each (task, normalisation site) has its own statistics-only BatchNorm, followed by the shared or mixed
affine γ/β. A template may be used at any depth, so N = 1 is a fully weight-tied network and N = L with
one-hot ξ the ordinary unshared one (both tested).

The block is an ordinary ``nn.Module`` (:class:`InvertedResidual`); the bank runs it through
:func:`torch.func.functional_call` with the mixed tensors, so the same module defines the templates' shapes,
their initialisation, and the unshared baseline.

Models built from the shared body (:class:`TemplateMixtureNet`):

- :class:`ProgramNet` — one program and one set of statistics: an ordinary backbone (``template-mixture``),
  usable with every strategy of the suite;
- :class:`TaskProgramNet` — per-task programs, statistics and heads, routed by Avalanche task labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from avalanche.models import MultiTaskModule
from torch import nn
from torch.func import functional_call

from clcompose.strategies.core.heads import MASK_VALUE
from clcompose.strategies.core.registry import ConfigError, Options


class ChannelAffine(nn.Module):
    """y = γ ⊙ x + β per channel: the affine half of a normalisation layer, kept apart from its statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))


def statistics_norm(channels: int) -> nn.BatchNorm2d:
    """The statistics half of a normalisation layer (running mean/variance, no affine)."""
    return nn.BatchNorm2d(channels, affine=False)


class InvertedResidual(nn.Module):
    """MobileNetV2-style isometric block, no final activation:

        x + A3(N3(project(act(A2(N2(depthwise(act(A1(N1(expand(x))))))))))

    with 1×1 expansion C → eC, k×k depthwise conv, 1×1 projection eC → C (all with bias), affine A_i and the
    statistics-only normalisations N_i passed in by the caller (they belong to a task, not to the block).
    """

    def __init__(self, channels: int, expansion: int = 6, kernel: int = 3, activation: str = "relu"):
        super().__init__()
        hidden = channels * expansion
        self.norm_features = (hidden, hidden, channels)
        self.activation = activation
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.affine1 = ChannelAffine(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.affine2 = ChannelAffine(hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.affine3 = ChannelAffine(channels)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](x)

    def forward(self, x: torch.Tensor, norms: Sequence[nn.Module]) -> torch.Tensor:
        h = self.act(self.affine1(norms[0](self.expand(x))))
        h = self.act(self.affine2(norms[1](self.depthwise(h))))
        return x + self.affine3(norms[2](self.project(h)))


ACTIVATIONS = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu}


class TemplateBank(nn.Module):
    """N template blocks stored as stacked tensors ``templates[name]`` of shape (N, *shape).

    ``forward(x, weights, norms)`` runs the block with every tensor replaced by Σ_k w_k · template_k: the
    mixing is linear in parameter space and done once per call, so a layer costs one block's compute.
    Templates are initialised as N independent blocks (PyTorch's default initialisation).
    """

    def __init__(self, make_block, n_templates: int):
        super().__init__()
        blocks = [make_block() for _ in range(n_templates)]
        # the block that gives the computation; its own tensors are never used, so it stays out of the module
        # tree (no dead parameters in state_dict or the optimiser)
        self._structure = [blocks[0]]
        self.names = [n for n, _ in blocks[0].named_parameters()]
        self.templates = nn.ParameterDict(
            {
                _key(n): nn.Parameter(torch.stack([dict(b.named_parameters())[n].detach() for b in blocks]))
                for n in self.names
            }
        )
        self.n_templates = n_templates

    @property
    def block(self) -> InvertedResidual:
        return self._structure[0]

    def template(self, k: int) -> dict[str, torch.Tensor]:
        """Template k's tensors, named as the block's parameters."""
        return {n: self.templates[_key(n)][k] for n in self.names}

    def mix(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_k w_k · template_k for every tensor of the block (``weights``: (N,))."""
        return {n: torch.tensordot(weights, self.templates[_key(n)], dims=1) for n in self.names}

    def forward(self, x: torch.Tensor, weights: torch.Tensor, norms: Sequence[nn.Module]) -> torch.Tensor:
        return functional_call(self.block, self.mix(weights), (x, norms))

    def parameters_per_template(self) -> int:
        return sum(p[0].numel() for p in self.templates.values())


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class TaskNorms(nn.Module):
    """The statistics of one task at every normalisation site: stem, 3 per block, output adapter."""

    def __init__(self, width: int, block_features: Sequence[int], blocks: int, feature_dim: int):
        super().__init__()
        self.stem = statistics_norm(width)
        self.blocks = nn.ModuleList(nn.ModuleList(statistics_norm(c) for c in block_features) for _ in range(blocks))
        self.adapter = statistics_norm(feature_dim)

    def statistics_count(self) -> int:
        """Stored numbers (running means and variances)."""
        return sum(b.numel() for n, b in self.named_buffers() if not n.endswith("num_batches_tracked"))


@dataclasses.dataclass
class TemplateMixtureOptions(Options):
    """Shape of the template-mixture network (defaults: a CPU-sized version of the paper's 16 blocks × 4 templates)."""

    blocks: int = 8  # L residual blocks
    templates: int = 4  # N templates in the bank (ignored when sharing = unshared: N = L)
    width: int = 16  # C channels between blocks
    expansion: int = 4  # hidden channels = expansion · width
    kernel: int = 3  # depthwise kernel
    stem_stride: int = 4  # strided stem: k×k conv with stride k (28×28 → 7×7); 1 for vector inputs
    in_channels: int = 1  # image channels (or the length of vector inputs)
    feature_dim: int = 64  # output adapter: 1×1 conv to this many channels, then global average pooling
    activation: Literal["relu", "relu6", "silu"] = "relu"
    sharing: Literal["templates", "unshared"] = "templates"  # unshared: N = L with fixed one-hot programs

    def check(self) -> None:
        for name in ("blocks", "templates", "width", "expansion", "stem_stride", "in_channels", "feature_dim"):
            self.require(getattr(self, name) >= 1, name, "must be >= 1")
        self.require(self.kernel >= 1 and self.kernel % 2 == 1, "kernel", "must be an odd number >= 1")


class TemplateMixtureNet(nn.Module):
    """The shared body: stem, template bank, output adapter. ``forward(x, mixture, norms)`` → features.

    ``mixture`` is an (L, N) matrix of mixture weights (rows on the simplex), ``norms`` a :class:`TaskNorms`.
    Inputs are images (B, C, H, W) or vectors (B, D), which run as 1×1 images (use ``stem_stride = 1``).
    """

    def __init__(self, options: TemplateMixtureOptions | None = None):
        super().__init__()
        o = options or TemplateMixtureOptions()
        self.options = o
        self.n_blocks = o.blocks
        self.n_templates = o.blocks if o.sharing == "unshared" else o.templates
        self.unshared = o.sharing == "unshared"
        self.out_features = o.feature_dim
        self.stem = nn.Conv2d(o.in_channels, o.width, o.stem_stride, stride=o.stem_stride)
        self.stem_affine = ChannelAffine(o.width)
        self.bank = TemplateBank(
            lambda: InvertedResidual(o.width, o.expansion, o.kernel, o.activation), self.n_templates
        )
        self.adapter = nn.Conv2d(o.width, o.feature_dim, 1)
        self.adapter_affine = ChannelAffine(o.feature_dim)

    def new_norms(self) -> TaskNorms:
        o = self.options
        norms = TaskNorms(o.width, self.bank.block.norm_features, o.blocks, o.feature_dim)
        return norms.to(self.stem.weight.device)

    def init_logits(self) -> torch.Tensor:
        """Fresh mixture logits ξ ~ U[0, 1) (the reference code's near-uniform start), shape (L, N)."""
        return torch.rand(self.n_blocks, self.n_templates, device=self.stem.weight.device)

    def fixed_mixture(self) -> torch.Tensor:
        """The unshared network's program: block ℓ uses template ℓ (identity)."""
        return torch.eye(self.n_blocks, device=self.stem.weight.device)

    def forward(self, x: torch.Tensor, mixture: torch.Tensor, norms: TaskNorms) -> torch.Tensor:
        if x.dim() == 2:
            x = x[:, :, None, None]
        if x.shape[1] != self.stem.in_channels:
            raise ValueError(
                f"template-mixture network expects {self.stem.in_channels} input channels, got {x.shape[1]} "
                "(set backbone.in_channels)"
            )
        if x.shape[-1] < self.stem.stride[0] or x.shape[-2] < self.stem.stride[0]:
            raise ValueError(
                f"inputs of size {tuple(x.shape[-2:])} are smaller than the stem stride {self.stem.stride[0]} "
                "(set backbone.stem_stride)"
            )
        h = F.relu(self.stem_affine(norms.stem(self.stem(x))))
        for layer in range(self.n_blocks):
            h = self.bank(h, mixture[layer], norms.blocks[layer])
        h = F.relu(self.adapter_affine(norms.adapter(self.adapter(h))))
        return h.mean(dim=(2, 3))


def mixture_of(logits: torch.Tensor) -> torch.Tensor:
    """softmax over templates, row by row: the mixture weights of a program."""
    return torch.softmax(logits, dim=-1)


class ProgramNet(nn.Module):
    """The template network with ONE program ξ (L × N logits) and one set of statistics: a plain backbone.

    With ``freeze_statistics()`` the normalisation layers stay in eval mode whatever ``train()`` says (the
    suite's BatchNorm policy for a pre-trained backbone, used when task vectors are taken on ξ).
    """

    def __init__(self, body: TemplateMixtureNet):
        super().__init__()
        self.body = body
        self.xi = None if body.unshared else nn.Parameter(body.init_logits())
        self.norms = body.new_norms()
        self.out_features = body.out_features
        self.statistics_frozen = False

    def mixture(self) -> torch.Tensor:
        return self.body.fixed_mixture() if self.xi is None else mixture_of(self.xi)

    def freeze_statistics(self) -> None:
        self.statistics_frozen = True
        self.norms.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.statistics_frozen:
            self.norms.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x, self.mixture(), self.norms)


class TaskProgramNet(MultiTaskModule):
    """Per-task programs ξ_t, statistics and linear heads around one shared :class:`TemplateMixtureNet`.

    Task labels (Avalanche's) route every example: task t runs the body with softmax(ξ_t) and its own
    statistics, and its head scores its own classes; the output has one column per class label, the other
    tasks' columns at :data:`~clcompose.strategies.core.heads.MASK_VALUE` (so cross-entropy and argmax are task-aware).
    A task met for the first time in training gets a new slot (ξ ~ U[0, 1), fresh statistics, a head with
    trunc-normal σ = 0.02 weights); an unknown task at evaluation scores MASK everywhere (never learned).
    """

    def __init__(self, body: TemplateMixtureNet):
        super().__init__()
        self.body = body
        self.programs = nn.ParameterDict()  # str(task) → ξ_t (L, N); empty for the unshared network
        self.norms = nn.ModuleDict()  # str(task) → TaskNorms
        self.heads = nn.ModuleDict()  # str(task) → Linear(F, classes of t)
        self.head_classes: dict[int, list[int]] = {}
        self.min_outputs = 0

    # ------------------------------------------------------------------ structure
    @property
    def tasks(self) -> list[int]:
        return list(self.head_classes)

    @property
    def num_outputs(self) -> int:
        seen = [c for cls in self.head_classes.values() for c in cls]
        return max(max(seen, default=-1) + 1, self.min_outputs)

    def add_task(self, task: int, classes: Sequence[int]) -> None:
        """A new slot for ``task``: program, statistics and head over ``classes``."""
        if task in self.head_classes:
            raise ValueError(f"task {task} already has a program")
        classes = sorted(int(c) for c in classes)
        overlap = set(classes) & {c for cls in self.head_classes.values() for c in cls}
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} already belong to another task")
        key = str(task)
        device = self.body.stem.weight.device
        if not self.body.unshared:
            self.programs[key] = nn.Parameter(self.body.init_logits())
        self.norms[key] = self.body.new_norms()
        head = nn.Linear(self.body.out_features, len(classes)).to(device)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        self.heads[key] = head
        self.head_classes[task] = classes

    def program(self, task: int) -> nn.Parameter | None:
        return self.programs[str(task)] if str(task) in self.programs else None

    def mixture(self, task: int) -> torch.Tensor:
        xi = self.program(task)
        return self.body.fixed_mixture() if xi is None else mixture_of(xi)

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        """What belongs to task t alone: its program and its head."""
        xi = self.program(task)
        return ([xi] if xi is not None else []) + list(self.heads[str(task)].parameters())

    @torch.no_grad()
    def adaptation(self, experience) -> None:
        """Training: a slot for every task label met for the first time (its classes from the data).
        Evaluation: only widen the output to the experience's classes."""
        dataset = experience.dataset
        if not self.training:
            classes = getattr(experience, "classes_in_this_experience", None) or dataset.targets.uniques
            self.min_outputs = max(self.min_outputs, max(classes, default=-1) + 1)
            return
        tasks = getattr(experience, "task_labels", None) or list(dataset.targets_task_labels.uniques)
        for task in sorted(tasks):
            if task in self.head_classes:
                continue
            self.add_task(int(task), dataset.task_set[task].targets.uniques)

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.body(x, self.mixture(task), self.norms[str(task)])

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        out = x.new_full((x.shape[0], self.num_outputs), MASK_VALUE)
        if task_label not in self.head_classes:
            return out
        logits = self.heads[str(task_label)](self.features(x, task_label))
        cols = torch.tensor(self.head_classes[task_label], device=x.device)
        return out.index_copy(1, cols, logits)

    def forward(self, x: torch.Tensor, task_labels) -> torch.Tensor:
        if isinstance(task_labels, int):
            return self.forward_single_task(x, task_labels)
        if task_labels is None:
            raise ValueError("TaskProgramNet needs task labels")
        out = x.new_full((x.shape[0], self.num_outputs), MASK_VALUE)
        for task in torch.unique(task_labels).tolist():
            idx = torch.nonzero(task_labels == task).flatten()
            out = out.index_copy(0, idx, self.forward_single_task(x[idx], int(task)))
        return out


@torch.no_grad()
def recalibrate_statistics(norms: nn.Module, forward, batches) -> None:
    """Replace the running statistics of every normalisation in ``norms`` by their exact averages over
    ``batches`` under the current weights ("precise BN", Wu & Johnson 2021): reset, then cumulative averages
    (momentum None) of the batch statistics while ``forward(x)`` runs with ``norms`` in training mode.

    During training the running statistics trail a moving network (momentum 0.1 over a few dozen steps); on
    small data the lag cost up to 40 points of test accuracy. Only ``norms`` change; nothing else is trained.
    """
    layers = [m for m in norms.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    was_training = norms.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    norms.train()
    for x in batches:
        forward(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    norms.train(was_training)


def body_of(model: nn.Module) -> TemplateMixtureNet:
    """The shared body inside whatever the run built around the ``template-mixture`` backbone."""
    for candidate in (
        model,
        getattr(model, "backbone", None),
        getattr(getattr(model, "backbone", None), "body", None),
        getattr(model, "body", None),
    ):
        if isinstance(candidate, TemplateMixtureNet):
            return candidate
        if isinstance(candidate, (ProgramNet, TaskProgramNet)):
            return candidate.body
    raise ConfigError("template strategies need the template-mixture backbone (--backbone template-mixture)")
