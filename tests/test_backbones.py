"""Backbones: real weights, BN policy, cached pre-training, the timm ViT path."""

import json
import os
from pathlib import Path

import pytest
import torch

from clcompose.bench.models.backbones import (
    BACKBONES,
    SmallCNNOptions,
    build_backbone,
    efficientnet_weights_path,
    pretrain_small_cnn,
)
from clcompose.strategies.core.registry import ConfigError


def test_efficientnet_loads_the_imagenet_weights_and_keeps_bn_frozen():
    model = build_backbone("efficientnet-lite0", {"image_size": 32})
    state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.net._conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.net._bn1.running_var, state["_bn1.running_var"])
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = model.net._bn0.running_mean.clone()
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 1280) and torch.isfinite(out).all()
    assert torch.equal(model.net._bn0.running_mean, before)  # statistics untouched by a training forward


def test_efficientnet_weights_are_imagenet_and_the_backbone_uses_them():
    """The shipped weights classify real photos as ImageNet-1k does; our feature path equals the package's."""
    import numpy as np
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_sample_images

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True))
    net.eval()
    photos = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] for im in load_sample_images().images]
    x = torch.cat([torch.nn.functional.interpolate(p, size=(224, 224), mode="bilinear") for p in photos])
    with torch.no_grad():
        top5 = net((x - 127) / 128).topk(5).indices.tolist()
    assert 985 in top5[1]  # flower.jpg → daisy
    assert {442, 832, 663, 538, 483, 698} & set(top5[0])  # china.jpg → bell cote / stupa / monastery / palace

    ours = build_backbone("efficientnet-lite0", {"image_size": 224}).eval()
    with torch.no_grad():
        expected = net.extract_features((x - 127) / 128).mean(dim=(2, 3))
        assert torch.allclose(ours(x / 255.0), expected, atol=1e-4)


def test_small_cnn_checkpoint_is_content_addressed_and_reused():
    opts = SmallCNNOptions(source="digits", pretrain_epochs=1, input_size=16, width=4)
    path, meta = pretrain_small_cnn(opts, progress=False)
    assert path.is_file() and path.parent == Path(os.environ["BENCH_CACHE"]) / "backbones"
    assert meta["recipe"]["source"] == "digits" and 0 <= meta["source_test_accuracy"] <= 1
    mtime = path.stat().st_mtime_ns
    again, _ = pretrain_small_cnn(opts, progress=False)
    assert again == path and path.stat().st_mtime_ns == mtime  # cache hit, not retrained
    other, _ = pretrain_small_cnn(
        SmallCNNOptions(source="digits", pretrain_epochs=2, input_size=16, width=4), progress=False
    )
    assert other != path
    a = build_backbone("small-cnn", opts.to_dict())
    b = build_backbone("small-cnn", opts.to_dict())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.load(path, weights_only=True).keys() == a.state_dict().keys()
    assert json.loads(path.with_suffix(".json").read_text())["recipe"]["data_digest"]


def test_tiny_random_vit_through_the_timm_code_path():
    model = build_backbone(
        "vit-b16", {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    )
    out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 48) and model.out_features == 48
    out.sum().backward()
    assert model.net.blocks[0].attn.qkv.weight.grad is not None


TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 2}


def test_vit_pretrained_offline_is_one_clear_line_within_a_second(monkeypatch):
    import time

    for offline in ("1", ""):  # HF_HUB_OFFLINE, and a node without a route to the hub
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        if not offline:
            monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
        t = time.perf_counter()
        with pytest.raises(ConfigError, match="backbone.checkpoint=PATH") as err:
            build_backbone("vit-b16", {"pretrained": True, **TINY_VIT})
        assert time.perf_counter() - t < 1.0
        assert "\n" not in str(err.value) and "unreachable" in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vit_loads_a_local_checkpoint(tmp_path, suffix):
    """A tiny random timm ViT saved to a file loads back through backbone.checkpoint with the same outputs."""
    import timm

    torch.manual_seed(0)
    saved = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=False, num_classes=0, **TINY_VIT).eval()
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    else:
        torch.save(saved.state_dict(), path)
    torch.manual_seed(1)  # a different random init: only the file can make the outputs agree
    loaded = build_backbone("vit-b16", {"pretrained": True, "checkpoint": str(path), **TINY_VIT}).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), saved((x - 0.5) / 0.5), atol=1e-6)
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("vit-b16", {"checkpoint": str(tmp_path / "missing.pth"), **TINY_VIT})
    with pytest.raises(ConfigError, match="checkpoint must be"):
        build_backbone("vit-b16", {"checkpoint": str(tmp_path / "weights.txt"), **TINY_VIT})


def test_backbone_names_and_option_validation():
    assert {"efficientnet-lite0", "small-cnn", "vit-b16"} <= set(BACKBONES.names())
    with pytest.raises(ConfigError, match="valid: .*efficientnet-lite0"):
        build_backbone("resnet-9000")
    with pytest.raises(ConfigError, match="image_size"):
        build_backbone("efficientnet-lite0", {"image_size": 4})
    with pytest.raises(ConfigError, match="unknown option"):
        build_backbone("small-cnn", {"colour": "red"})
