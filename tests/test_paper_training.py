"""GPU-grade training on CPU: mixed precision against a hand-written GradScaler loop, and a run killed inside an
experience that resumes to bit-identical task vectors and metrics."""

from __future__ import annotations

import pytest
import torch

from clcompose.bench.data.fake_folders import write_fake_dataset
from clcompose.bench.runs import inside
from clcompose.bench.runs.config import RunConfig
from clcompose.bench.runs.run import execute
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.core.training import TrainConfig, template_kwargs

TINY_VIT = {"pretrained": False, "img_size": 16, "depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 8}


def test_fp16_matches_a_hand_written_grad_scaler_loop():
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
    from avalanche.training.templates import SupervisedTemplate
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    x[3] *= 1e5  # a large input: the first scale (2**16) overflows fp16, so that step must be skipped
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())

    train = TrainConfig(epochs=1, batch_size=8, optimizer="adam", lr=0.01, precision="fp16")
    ds = TensorDataset(x, y)
    ds.targets = y.tolist()
    data = _make_taskaware_classification_dataset(ds, task_labels=0)
    from avalanche.benchmarks import dataset_benchmark

    scenario = dataset_benchmark([data], [data])
    strategy = SupervisedTemplate(**template_kwargs(model, train, None, "cpu", []))
    strategy.train(scenario.train_stream[0], eval_streams=[], shuffle=False)

    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    skipped = 0
    for i in range(0, 24, 8):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = reference(x[i : i + 8])
        loss = torch.nn.functional.cross_entropy(out.float(), y[i : i + 8])
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale
    assert skipped >= 1  # the overflow really happened and was skipped
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_precision_and_workers_are_config_errors():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="workers"):
        TrainConfig(workers=-1)
    with pytest.raises(ConfigError, match="checkpoint_every_min"):
        RunConfig(train={"checkpoint_every_min": -1}).resolve()


class Killed(Exception):
    pass


def _untimed(value):
    """``value`` without its wall-clock entries (keys ending in ``_s`` or named ``seconds``)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not (k.endswith("_s") or k.endswith("seconds"))}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def _config(root, strategy: str, train: dict, options: dict) -> RunConfig:
    return RunConfig(
        benchmark="split-imagefolder",
        backbone="vit-b16",
        strategy=strategy,
        benchmark_options={"data_root": str(root), "image_size": 16, "n_experiences": 2},
        backbone_options=TINY_VIT,
        strategy_options=options,
        train={"epochs": 2, "batch_size": 4, "optimizer": "adam", "lr": 0.01, "checkpoint_every_min": 0, **train},
    )


@pytest.mark.parametrize(
    ("strategy", "train", "options", "kill_at"),
    [
        ("ita", {"virtual_batch": 2}, {"tuning": "lora"}, 13),  # inside experience 2, at a virtual-batch boundary
        ("task-arithmetic", {"precision": "bf16"}, {}, 7),  # inside experience 1, second epoch
    ],
)
def test_a_run_killed_inside_an_experience_resumes_bit_identically(
    tmp_path, monkeypatch, strategy, train, options, kill_at
):
    root = write_fake_dataset("split-imagefolder", tmp_path / "data", per_class=4)
    resolved = _config(root, strategy, train, options).resolve()
    whole = execute(resolved, progress=False, artifacts_dir=tmp_path / "whole")

    calls = {"n": 0}
    original = inside.InsideExperience.after_training_iteration

    def kill(self, strategy_, **kwargs):
        original(self, strategy_, **kwargs)  # checkpoints (every_min = 0), then dies
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed

    ckpt = tmp_path / "run" / "checkpoint.pt"
    monkeypatch.setattr(inside.InsideExperience, "after_training_iteration", kill)
    with pytest.raises(Killed):
        execute(resolved, progress=False, artifacts_dir=tmp_path / "run", checkpoint_path=ckpt)
    assert inside.inside_path(ckpt).exists()
    monkeypatch.setattr(inside.InsideExperience, "after_training_iteration", original)
    resumed = execute(resolved, progress=False, artifacts_dir=tmp_path / "run", checkpoint_path=ckpt)

    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["metrics"] == whole["metrics"]
    assert _untimed(resumed.get("strategy_extras")) == _untimed(whole.get("strategy_extras"))
    assert len(resumed["resumes"]) == 1
    assert any(s.get("resumed_inside") for s in resumed["timing"]["steps"])
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "task_vectors.safetensors")
    b = load_file(tmp_path / "run" / "task_vectors.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the kill really changed something: training was mid-experience, not at a boundary
    assert calls["n"] == kill_at
    step = whole["timing"]["steps"][0]
    assert step["train_images"] > 0 and step["images_per_s"] > 0
