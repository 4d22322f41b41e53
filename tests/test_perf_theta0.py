"""One θ0 pass per experience: the Fisher reuses the forward that gives the probe's features, with the same sums
as a Fisher with its own forward (the old procedure) and the same run, bit for bit."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from clcompose.bench.runs.run import run
from clcompose.strategies.core.fisher import fisher_sum
from clcompose.strategies.core.per_example import RetainedFisherPass, layer_fisher_sum
from clcompose.strategies.task_vectors import theta0

DIGITS = {
    "benchmark": "split-digits",
    "backbone": "small-cnn",
    "benchmark_options": {"n_experiences": 5, "per_class": 24, "test_per_class": 20},
    "backbone_options": {"source": "mnist5k", "pretrain_epochs": 3, "width": 8, "input_size": 16},
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 16, "optimizer": "adamw", "lr": 0.002},
}
FAST = {"probe_epochs": 3, "align_epochs": 2, "align_epochs_per_task": 1, "align_per_class": 16, "rank": 2}


def _net():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Flatten())
    head = nn.Linear(4 * 3 * 3, 5)
    for p in [*body.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    return body, head


@pytest.mark.parametrize("mode", ["exact", "topk", "sampled"])
def test_retained_pass_gives_the_sums_of_a_separate_fisher_and_of_the_vmap_reference(mode):
    body, head = _net()
    modules = {"0.weight": body[0], "2.weight": body[2]}
    x = torch.randn(9, 1, 8, 8)
    batches = [x[:4], x[4:]]
    retained = RetainedFisherPass(modules)
    features = torch.cat([retained.forward(body, b) for b in batches])
    assert not features.requires_grad and torch.equal(features, body(x))
    head.weight.add_(0.5)  # the head is decided after the forward (the probe), as the anchor is

    def log_prob(f):
        return F.log_softmax(head(f), dim=-1)

    got, n = retained.fisher_sum(log_prob, mode=mode, k=2, chunk=3, generator=torch.Generator().manual_seed(1))
    assert not retained.batches  # the graphs are released
    separate, m = layer_fisher_sum(
        lambda xb: log_prob(body(xb)),
        modules,
        batches,
        mode=mode,
        k=2,
        chunk=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert n == m == 9 and all(torch.equal(got[k], separate[k]) for k in modules)

    params = {k: mod.weight for k, mod in modules.items()}

    def one(weights, xi):
        return log_prob(functional_call(body, dict(weights), (xi[None],))[0])

    if mode != "sampled":  # the vmap estimator draws its labels in another order
        ref, _ = fisher_sum(one, params, batches, mode=mode, k=2, chunk=4)
        for k in modules:
            assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6 * float(ref[k].abs().max())), k


def _count_backbone_examples(monkeypatch):
    """Examples that go through the backbone during preparation (θ0 pass and Fisher), per experience."""
    from clcompose.strategies.task_vectors.base import TaskVectorStrategy

    counts: list[int] = []
    original = TaskVectorStrategy._prepare_experience

    def counting(self):
        seen = [0]
        handle = self.pool.model.register_forward_hook(lambda m, a, o: seen.__setitem__(0, seen[0] + len(a[0])))
        try:
            original(self)
        finally:
            handle.remove()
        counts.append(seen[0])

    monkeypatch.setattr(TaskVectorStrategy, "_prepare_experience", counting)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("strategy, options", [("ita", {"fisher": "exact", "fisher_max_examples": None}), ("iel", {})])
def test_one_theta0_pass_per_experience_and_the_same_run_as_a_separate_fisher_forward(
    strategy, options, tmp_path, monkeypatch
):
    """The default preset (sampled Fisher on ≤ 64 examples: here every one of the 48 per experience) and the exact
    Fisher: the run with the Fisher's own forward (RETAIN_MAX_EXAMPLES = 0, the old procedure) is the 'before'."""
    cfg = json.loads(json.dumps(DIGITS)) | {"strategy": strategy, "strategy_options": FAST | options}
    counts = _count_backbone_examples(monkeypatch)
    fused_path, fused = run(cfg, runs_dir=tmp_path / "fused", progress=False)
    one_pass = list(counts)
    counts.clear()
    monkeypatch.setattr(theta0, "RETAIN_MAX_EXAMPLES", 0)
    separate_path, separate = run(cfg, runs_dir=tmp_path / "separate", progress=False)
    assert sum(one_pass) == 10 * 24 and counts == [2 * n for n in one_pass]  # one θ0 forward of each example, not two
    assert fused["accuracy_matrix"] == separate["accuracy_matrix"]
    assert fused["metrics"] == separate["metrics"]
    assert fused["strategy_extras"]["diagnostics"] == separate["strategy_extras"]["diagnostics"]
    tau_fused, tau_separate = (load_file(p.parent / "task_vectors.safetensors") for p in (fused_path, separate_path))
    assert tau_fused.keys() == tau_separate.keys() and all(
        torch.equal(tau_fused[k], tau_separate[k]) for k in tau_fused
    )
    prep = fused["strategy_extras"]["preparation"]
    assert all(0 <= p["theta0_s"] <= p["consolidation_s"] <= p["prepare_s"] for p in prep)


@pytest.mark.slow
def test_a_subsampled_fisher_keeps_its_own_forward(tmp_path, monkeypatch):
    cfg = json.loads(json.dumps(DIGITS)) | {"strategy": "ita", "strategy_options": FAST | {"fisher_max_examples": 10}}
    cfg["benchmark_options"]["n_experiences"] = 2
    counts = _count_backbone_examples(monkeypatch)
    run(cfg, runs_dir=tmp_path, progress=False)
    assert counts == [130, 130]  # 5 classes × 24 for the features, 10 for the Fisher's sample
