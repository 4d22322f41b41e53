"""The GPU code paths without a GPU: every strategy's `bench run` with ``device: cuda`` on an emulated CUDA
device (tests/fake_cuda.py) finishes and gives the CPU run's accuracy matrix, resumes from its checkpoints, and
the emulation itself rejects what CUDA rejects. Before this test, ITA, IEL, task arithmetic, the linear probe and
MagMax crashed at their first classifier alignment or diagnostics row on any GPU (CPU samples against cuda
heads), and every resume on a GPU started again from scratch."""

import copy
import json

import pytest
import torch

from clcompose.bench.runs.run import run
from clcompose.strategies.task_vectors.consolidation import ClassGaussians, align_classifier
from clcompose.strategies.task_vectors.diagnostics import fisher_weighted_spread
from tests.fake_cuda import FakeCudaTensor, fake_cuda
from tests.test_competitors_vit import CONFIG as VIT
from tests.test_ita_iel import config as ita_config
from tests.test_ita_iel import preset_config
from tests.test_run import small
from tests.test_teacher_runs import META
from tests.test_teacher_runs import _config as teacher_config
from tests.test_template_strategies import tiny as template_config


def test_the_emulated_device_rejects_what_cuda_rejects_and_keeps_modules_parameters():
    with fake_cuda():
        assert torch.cuda.is_available()
        lin = torch.nn.Linear(3, 2)
        weight = lin.weight
        lin.to("cuda")
        assert lin.weight is weight and lin.weight.device == torch.device("cuda", 0)  # same Parameter, moved
        assert isinstance(lin.weight, torch.nn.Parameter) and isinstance(lin.weight, FakeCudaTensor)
        x = torch.randn(4, 3, device="cuda")
        assert x.is_cuda and x.cpu().device.type == "cpu" and not isinstance(x.cpu(), FakeCudaTensor)
        with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cpu"):
            lin(torch.randn(4, 3))
        with pytest.raises(RuntimeError, match="Expected a 'cuda' device type for generator"):
            torch.randn(3, device="cuda", generator=torch.Generator())
        with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
            x.numpy()
        assert (x * torch.tensor(2.0)).is_cuda  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert x[torch.tensor([0, 2])].shape == (2, 3)  # CPU indices into a cuda tensor, as on CUDA
        lin(x).square().sum().backward()
        assert lin.weight.grad.is_cuda
        want = torch.nn.functional.linear(x.cpu(), lin.weight.detach().cpu(), lin.bias.detach().cpu())
        assert torch.equal(lin(x).detach().cpu(), want)  # the same CPU kernels
    assert not torch.cuda.is_available()


def test_classifier_alignment_trains_heads_on_the_gpu_from_cpu_drawn_samples_bit_for_bit():
    """The samples come from a CPU generator (the reproducible stream); the heads may live on the GPU."""
    from clcompose.strategies.core.heads import ExperienceHeads

    torch.manual_seed(0)
    feats, labels = torch.randn(60, 5), torch.arange(6).repeat(10)
    stats = ClassGaussians()
    stats.fit(feats, labels)
    heads = ExperienceHeads(5)
    heads.add_head([0, 1, 2], generator=torch.Generator().manual_seed(1))
    heads.add_head([3, 4, 5], generator=torch.Generator().manual_seed(2))
    cpu = copy.deepcopy(heads)
    kwargs = dict(epochs=3, lr=0.1, per_class=8, temperature=0.5, batch_size=16)
    align_classifier(cpu, stats, generator=torch.Generator().manual_seed(3), **kwargs)
    with fake_cuda():
        heads.to("cuda")
        align_classifier(heads, stats, generator=torch.Generator().manual_seed(3), **kwargs)
        assert all(p.is_cuda for p in heads.parameters())
        for a, b in zip(cpu.parameters(), heads.parameters()):
            assert torch.equal(a, b.detach().cpu())
        deltas, fisher = torch.randn(3, 7), torch.rand(7)
        on_gpu = fisher_weighted_spread(deltas.to("cuda"), [0.2, 0.3, 0.5], fisher.to("cuda"))
    assert on_gpu == fisher_weighted_spread(deltas, [0.2, 0.3, 0.5], fisher)  # the diagnostics' spread row


def _vit(strategy: str, **options) -> dict:
    cfg = json.loads(json.dumps(VIT)) | {"strategy": strategy, "strategy_options": options}
    cfg["benchmark_options"]["n_experiences"] = 2
    return cfg


VIT_TASK_VECTORS = {
    "probe_epochs": 1,
    "align_epochs": 1,
    "align_epochs_per_task": 1,
    "fisher_max_examples": 16,
    "diagnostics_examples": 10,
}

CASES = {
    "naive": lambda: small("naive", train={"epochs": 1}),
    "naive, 2 loader workers": lambda: small("naive", train={"workers": 2, "epochs": 1}),
    "ewc": lambda: small("ewc", train={"epochs": 1}),
    "lwf": lambda: small("lwf", train={"epochs": 1}),
    "der++": lambda: small("der++", train={"epochs": 1}),
    "joint": lambda: small("joint", train={"epochs": 1}),
    "slca": lambda: small("slca", train={"epochs": 1}),
    "magmax": lambda: small("magmax", train={"epochs": 1}),
    "linear-probe": lambda: small("linear-probe", train={"epochs": 1}),
    "task-arithmetic": lambda: small("task-arithmetic", train={"epochs": 1}),
    "ita, reference preset, lora": lambda: preset_config("ita", tuning="lora"),
    "ita, reference preset, full": lambda: preset_config("ita", tuning="full"),
    "ita, proximal step, sampled Fisher": lambda: preset_config(
        "ita", tuning="lora", reg_step="proximal", fisher="sampled"
    ),
    "iel, reference preset, lora": lambda: preset_config("iel", tuning="lora"),
    "ita, ia3": lambda: ita_config("ita", tuning="ia3"),
    "template-finetune": lambda: template_config("template-finetune"),
    "template-program": lambda: template_config("template-program"),
    "l2p": lambda: _vit("l2p"),
    "coda-prompt": lambda: _vit("coda-prompt"),
    "inflora": lambda: _vit("inflora"),
    "ita on a ViT": lambda: _vit("ita", **VIT_TASK_VECTORS),
    "meta-hnet": lambda: teacher_config("teacher-connected", "meta-hnet", strategy_options=META),
    "meta-anil": lambda: teacher_config("teacher-connected", "meta-anil", strategy_options=META),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_on_the_gpu_path_finishes_with_the_cpu_runs_results(case, tmp_path):
    cfg = CASES[case]()
    _, cpu = run(cfg, runs_dir=tmp_path / "cpu", progress=False)
    before = FakeCudaTensor.ops
    with fake_cuda():
        _, gpu = run(dict(cfg, device="cuda"), runs_dir=tmp_path / "gpu", progress=False)
    assert gpu["status"] == "complete" and gpu["config"]["device"] == "cuda"
    assert FakeCudaTensor.ops - before > 1000  # the run computed on the emulated device, not beside it
    assert gpu["environment"]["cuda"] == "fake-cuda (CPU)"
    assert gpu["accuracy_matrix"] == cpu["accuracy_matrix"] and gpu["metrics"] == cpu["metrics"]


def test_bench_perf_strategies_and_compose_run_on_the_gpu_path_and_name_the_device(tmp_path):
    from clcompose.bench.cli import main as bench_main

    out = tmp_path / "perf"
    common = ["--out", str(out), "--device", "cuda", "--quiet"]
    strategies = ["perf", "strategies", *common, "--strategies", "naive,ita", "--per-class", "3", "--epochs", "1"]
    strategies += ["--test-per-class", "3", "--n-experiences", "2", "--repeats", "1"]
    compose = ["perf", "compose", *common, "--compose-styles", "lora", "--compose-tasks", "2", "--compose-rounds", "1"]
    compose += ["--compose-eval-batch", "4"]
    before = FakeCudaTensor.ops
    with fake_cuda():
        assert bench_main(strategies) == 0 and bench_main(compose) == 0
    assert FakeCudaTensor.ops - before > 1000
    data = json.loads((out / "perf.json").read_text())
    for section in ("strategies", "compose"):
        measured = data[section]["measured"]
        assert measured["settings"]["device"] == "cuda" and measured["machine"]["cuda"] == "fake-cuda (CPU)"
    assert data["strategies"]["summary"]["ita"]["fisher_per_experience_s"] > 0
    assert data["compose"]["rows"] and all(r["max_abs_logit_diff"] == 0.0 for r in data["compose"]["rows"])


@pytest.mark.parametrize("strategy, k", [("naive", 2), ("task-arithmetic", 3)])  # ITA: mid-experience below
def test_a_run_on_the_gpu_resumes_from_its_experience_checkpoint_identically(strategy, k, tmp_path, monkeypatch):
    """Before, torch.load mapped every storage to cuda, the CPU RNG states too: every resume on a GPU failed to
    read its checkpoint and started the run again from scratch."""
    from tests.test_resume import CONFIG, Killed, kill_after

    cfg = CONFIG | {"strategy": strategy, "device": "cuda"}
    with fake_cuda():
        _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
        with monkeypatch.context() as m:
            kill_after(m, k)
            with pytest.raises(Killed):
                run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
        _, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert [r["from_step"] for r in resumed["resumes"]] == [k]  # from the checkpoint, not from scratch
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"] and resumed["metrics"] == reference["metrics"]


def test_a_run_on_the_gpu_killed_inside_an_experience_resumes_bit_identically(tmp_path, monkeypatch):
    import dataclasses

    from clcompose.bench.data.fake_folders import write_fake_dataset
    from clcompose.bench.runs import inside
    from clcompose.bench.runs.run import execute
    from tests.test_paper_training import Killed, _config, _untimed

    root = write_fake_dataset("split-imagefolder", tmp_path / "data", per_class=4)
    cfg = _config(root, "ita", {"virtual_batch": 2}, {"tuning": "lora"})
    resolved = dataclasses.replace(cfg, device="cuda").resolve()
    original = inside.InsideExperience.after_training_iteration
    calls = {"n": 0}

    def kill(self, strategy_, **kwargs):
        original(self, strategy_, **kwargs)
        calls["n"] += 1
        if calls["n"] == 13:  # inside experience 2, at a virtual-batch boundary
            raise Killed

    ckpt = tmp_path / "run" / "checkpoint.pt"
    with fake_cuda():
        whole = execute(resolved, progress=False, artifacts_dir=tmp_path / "whole")
        monkeypatch.setattr(inside.InsideExperience, "after_training_iteration", kill)
        with pytest.raises(Killed):
            execute(resolved, progress=False, artifacts_dir=tmp_path / "run", checkpoint_path=ckpt)
        monkeypatch.setattr(inside.InsideExperience, "after_training_iteration", original)
        resumed = execute(resolved, progress=False, artifacts_dir=tmp_path / "run", checkpoint_path=ckpt)
    assert any(s.get("resumed_inside") for s in resumed["timing"]["steps"])
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["metrics"] == whole["metrics"]
    assert _untimed(resumed.get("strategy_extras")) == _untimed(whole.get("strategy_extras"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_the_gpu_path(precision, tmp_path):
    """autocast("cuda") and the cuda GradScaler's plumbing (the emulation does not cast, so the numbers are fp32's
    and are not compared with the CPU run's, which casts under autocast("cpu"))."""
    cfg = ita_config("task-arithmetic")
    cfg["train"] |= {"precision": precision, "epochs": 1}
    with fake_cuda():
        _, rec = run(dict(cfg, device="cuda"), runs_dir=tmp_path, progress=False)
    assert rec["status"] == "complete" and rec["config"]["train"]["precision"] == precision
    assert 0 < rec["metrics"]["final_average_accuracy"] <= 1


def test_checkpoint_storages_saved_on_the_cpu_stay_there_and_device_ones_go_to_the_runs_device(monkeypatch):
    from clcompose.bench.runs import checkpoint

    assert checkpoint.map_location("cpu") == "cpu"  # a CPU run (or reading a GPU checkpoint on a laptop)
    calls = []
    monkeypatch.setattr(torch.serialization, "default_restore_location", lambda s, loc: calls.append(loc) or "moved")
    place = checkpoint.map_location("cuda:0")
    storage = torch.zeros(3).untyped_storage()
    assert place(storage, "cpu") is storage and not calls  # RNG states, CPU-side statistics
    assert place(storage, "cuda:1") == "moved" and calls == ["cuda:0"]  # saved on another node's cuda:1
