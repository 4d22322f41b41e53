"""timm Vision Transformers (``vit-b16``): the paper's ViT-B/16 on GPU clusters, a tiny random ViT in the tests.

Weights come from a local file (``checkpoint``: a timm ``.safetensors``/``.pth``/``.bin`` state dict or Google's
``.npz``, through timm's ``pretrained_cfg_overlay``), which is what an offline compute node needs, or else from
the Hugging Face hub cache. A node that cannot reach the hub (``HF_HUB_OFFLINE=1``, or no route to it) looks in
the cache only and, when the weights are not there, fails at once with one line naming ``backbone.checkpoint``
(the hub client alone would retry for about a minute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

from clcompose.bench.models.backbones import BACKBONES, resize, to_channels
from clcompose.strategies.core.registry import ConfigError, Options

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
NORMALIZATION = {  # per-channel (mean, std) applied to images in [0, 1]
    "in21k": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclasses.dataclass
class ViTOptions(Options):
    """A timm Vision Transformer; pre-trained weights from ``checkpoint`` (a local file) or the hub's cache."""

    model_name: str = "vit_base_patch16_224.augreg_in21k"
    pretrained: bool = True
    checkpoint: str | None = None  # local weights file for offline nodes (timm .safetensors/.pth/.bin, or .npz)
    img_size: int = 224
    depth: int | None = None  # architecture overrides, e.g. a tiny random ViT for tests
    embed_dim: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    # input normalisation: the in21k augreg recipe (mean = std = 0.5; the reference's Split CIFAR-100), ImageNet's
    # statistics (the reference's CUB, MIT-67, RESISC45, CropDiseases configs), or none (its ImageNet-R config)
    normalization: Literal["in21k", "imagenet", "none"] = "in21k"

    def check(self) -> None:
        self.require(self.img_size >= 8, "img_size", "must be >= 8")
        for name in ("depth", "embed_dim", "num_heads", "patch_size"):
            self.require(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1")
        if self.checkpoint is not None:
            self.require(
                self.checkpoint.endswith(WEIGHT_SUFFIXES), "checkpoint", f"must be a {'/'.join(WEIGHT_SUFFIXES)} file"
            )


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (False at once under ``HF_HUB_OFFLINE``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


class _CacheOnly:
    """Within the block the hub client uses its local cache only (it re-reads this flag on every request)."""

    def __enter__(self):
        from huggingface_hub import constants

        self._constants, self._old = constants, constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        self._constants.HF_HUB_OFFLINE = self._old


class TimmViT(nn.Module):
    """Images → resize → normalise (``normalization``; in21k augreg: mean = std = 0.5) → [CLS] features."""

    def __init__(self, options: ViTOptions):
        super().__init__()
        import timm

        overrides = {
            k: getattr(options, k)
            for k in ("depth", "embed_dim", "num_heads", "patch_size")
            if getattr(options, k) is not None
        }
        kwargs = dict(num_classes=0, img_size=options.img_size, **overrides)
        if options.pretrained and options.checkpoint is not None:
            path = Path(options.checkpoint).expanduser()
            if not path.is_file():
                raise ConfigError(f"backbone.checkpoint {path} does not exist")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        online = not options.pretrained or options.checkpoint is not None or hub_reachable()
        try:
            with _CacheOnly() if not online else contextlib.nullcontext():
                self.net = timm.create_model(options.model_name, pretrained=options.pretrained, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
                raise ConfigError(f"timm does not know the model {options.model_name!r}") from None
            if options.checkpoint is not None:
                raise ConfigError(
                    f"backbone.checkpoint {options.checkpoint} does not fit {options.model_name}: {str(exc).splitlines()[0]}"
                ) from None
            raise
        except OSError as exc:  # not in the cache, and the hub is unreachable or refused
            where = (
                "the hub is unreachable (HF_HUB_OFFLINE or no network) and its local cache lacks them"
                if not online
                else f"the hub refused ({type(exc).__name__})"
            )
            raise ConfigError(
                f"pre-trained weights of {options.model_name}: {where}; put a weights file on the node and set "
                "backbone.checkpoint=PATH, or set backbone.pretrained=false"
            ) from None
        self.img_size = options.img_size
        self.out_features = self.net.num_features
        mean, std = NORMALIZATION[options.normalization]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(to_channels(x, 3), self.img_size)
        return self.net((x - self.mean) / self.std)


@BACKBONES.register("vit-b16", ViTOptions)
def vit_b16(options: ViTOptions) -> nn.Module:
    """timm ViT-B/16 (ImageNet-21k augreg): weights from backbone.checkpoint or the hub cache; architecture overridable."""
    return TimmViT(options)
