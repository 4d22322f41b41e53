"""DER++ and SLCA: loss terms and optimiser groups against hand-written formulas, end to end, resume, aggregate."""

import copy
import math

import pandas as pd
import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from clcompose.bench.data.benchmarks import build_benchmark
from clcompose.bench.runs.run import run
from clcompose.strategies.baselines.derpp import derpp_loss, pad_logits_collate
from clcompose.strategies.core.heads import MASK_VALUE, ClassIncrementalNet
from clcompose.strategies.core.registry import STRATEGIES, ConfigError
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.consolidation import ClassGaussians, align_classifier

CONFIG = {  # as tests/test_resume.py: digits + a small CNN, about a second per run on one thread
    "benchmark": "split-digits",
    "backbone": "small-cnn",
    "benchmark_options": {"n_experiences": 5, "per_class": 30},
    "backbone_options": {"source": "digits", "pretrain_epochs": 1, "width": 8, "input_size": 16},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "adam", "lr": 0.003},
    "seed": 4,
    "stream_seed": 1,
}


class FlatBackbone(nn.Module):
    """8×8 digits → a linear feature map (tiny and deterministic)."""

    out_features = 6

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, self.out_features)

    def forward(self, x):
        return self.lin(x.flatten(1))


def digits(n_experiences=5):
    return build_benchmark("split-digits", {"n_experiences": n_experiences, "per_class": 20}, stream_seed=0)


def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """−(1/B) Σ_i log softmax(z_i)_{y_i}, written out row by row."""
    total = 0.0
    for z, y in zip(logits.tolist(), labels.tolist()):
        top = max(z)
        total += -(z[y] - top - math.log(sum(math.exp(v - top) for v in z)))
    return total / len(labels)


class Capture(SupervisedPlugin):
    """Records what one training iteration's loss was built from (before backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def before_backward(self, strategy, **kwargs):
        if strategy.replay_loader is not None:
            self.seen.append(
                (
                    strategy.mb_output.detach().clone(),
                    strategy.mb_y.clone(),
                    strategy.batch_logits.clone(),
                    float(strategy.loss),
                )
            )


def test_derpp_loss_terms_equal_hand_written_ones_on_a_fixed_buffer():
    torch.manual_seed(0)
    bm = digits()
    capture = Capture()
    options = STRATEGIES["der++"].options.from_dict({"alpha": 0.3, "beta": 0.7, "mem_size": 30, "batch_size_mem": 8})
    strategy = STRATEGIES["der++"].factory(
        ClassIncrementalNet(FlatBackbone()), options, TrainConfig(epochs=1, batch_size=10), plugins=[capture]
    )
    first, second = bm.train_stream[0], bm.train_stream[1]
    strategy.train(first)
    buffer = strategy.storage_policy.buffer
    assert len(buffer) == 30 and {int(y) for y in buffer.targets} == set(first.classes_in_this_experience)
    strategy.train(second)
    assert capture.seen
    old = sorted(int(c) for c in first.classes_in_this_experience)  # the columns with a head when ẑ was stored
    for out, y, stored, loss in capture.seen:
        m = 8
        z_stream, z_buf = out[m:], out[:m]
        squares = [
            (z_buf[i, c].item() - stored[i, c].item()) ** 2
            for i in range(m)
            for c in range(stored.shape[1])
            if c in old
        ]
        assert all(stored[i, c] == MASK_VALUE for i in range(m) for c in range(stored.shape[1]) if c not in old)
        expected = hand_ce(z_stream, y[m:]) + 0.3 * sum(squares) / len(squares) + 0.7 * hand_ce(z_buf, y[:m])
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_derpp_loss_pads_narrow_stored_rows_and_collate_pads_to_the_widest():
    logits, buffer_logits = torch.randn(3, 5), torch.randn(2, 5)
    stored = torch.tensor([[1.0, MASK_VALUE, 2.0], [0.5, 0.25, MASK_VALUE]])
    got = derpp_loss(logits, torch.tensor([0, 4, 2]), buffer_logits, torch.tensor([0, 1]), stored, 2.0, 0.0)
    pairs = [(0, 0, 1.0), (0, 2, 2.0), (1, 0, 0.5), (1, 1, 0.25)]
    mse = sum((buffer_logits[i, c].item() - v) ** 2 for i, c, v in pairs) / 4
    assert float(got) == pytest.approx(hand_ce(logits, torch.tensor([0, 4, 2])) + 2.0 * mse, rel=1e-6)
    batch = pad_logits_collate([(torch.zeros(2), 1, 0, torch.ones(2)), (torch.ones(2), 3, 0, torch.ones(4))])
    assert batch[3].tolist() == [[1, 1, MASK_VALUE, MASK_VALUE], [1, 1, 1, 1]] and batch[1].tolist() == [1, 3]


def test_slca_parameter_groups_have_the_stated_learning_rates():
    torch.manual_seed(0)
    bm = digits()
    model = ClassIncrementalNet(FlatBackbone())
    options = STRATEGIES["slca"].options.from_dict({"backbone_lr_scale": 0.01, "align": False})
    train = TrainConfig(epochs=1, batch_size=10, optimizer="sgd", lr=0.5, momentum=0.0)
    strategy = STRATEGIES["slca"].factory(model, options, train)
    strategy.train(bm.train_stream[0])
    strategy.train(bm.train_stream[1])  # a second head is added: it must join the head group
    backbone_group, head_group = strategy.optimizer.param_groups
    assert backbone_group["lr"] == pytest.approx(0.005) and head_group["lr"] == pytest.approx(0.5)
    assert {id(p) for p in backbone_group["params"]} == {id(p) for p in strategy.model.backbone.parameters()}
    assert {id(p) for p in head_group["params"]} == {id(p) for p in strategy.model.heads.parameters()}
    assert len(head_group["params"]) == 4
    # one plain SGD step moves each parameter by −lr_group · grad
    before = [p.detach().clone() for p in strategy.model.parameters()]
    x, y = next(iter(torch.utils.data.DataLoader(bm.train_stream[1].dataset, batch_size=10)))[:2]
    strategy.optimizer.zero_grad()
    nn.functional.cross_entropy(strategy.model(x), y).backward()
    grads = [p.grad.clone() for p in strategy.model.parameters()]
    strategy.optimizer.step()
    for (name, p), b, g in zip(strategy.model.named_parameters(), before, grads):
        lr = 0.5 if name.startswith("heads.") else 0.005
        assert torch.allclose(p.detach(), b - lr * g, atol=1e-7), name


class HeadsBeforeAlignment(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.heads = None

    def after_training_epoch(self, strategy, **kwargs):
        self.heads = copy.deepcopy(strategy.model.heads)


def test_slca_alignment_equals_align_classifier_on_the_same_statistics_and_seed():
    torch.manual_seed(0)
    bm = digits()
    grab = HeadsBeforeAlignment()
    opts = {"align_epochs": 3, "align_per_class": 16, "align_batch_size": 8, "align_seed": 7}
    options = STRATEGIES["slca"].options.from_dict(opts)
    strategy = STRATEGIES["slca"].factory(
        ClassIncrementalNet(FlatBackbone()), options, TrainConfig(epochs=1, batch_size=10), plugins=[grab]
    )
    for t in range(2):
        experience = bm.train_stream[t]
        strategy.train(experience)
        model = strategy.model.eval()
        loader = torch.utils.data.DataLoader(experience.dataset.eval(), batch_size=1000)
        x, y = next(iter(loader))[:2]
        with torch.no_grad():
            feats = model.backbone(x)
        for c in experience.classes_in_this_experience:  # the statistics: mean and (floored) variance by hand
            w, mu, var = strategy.stats.params[int(c)]
            rows = feats[y == c]
            assert torch.allclose(mu[0], rows.mean(0), atol=1e-5)
            assert torch.allclose(var[0], ((rows - rows.mean(0)) ** 2).mean(0).clamp_min(1e-4), atol=1e-5)
        expected = grab.heads
        align_classifier(
            expected,
            strategy.stats,
            epochs=3,
            lr=0.01,
            per_class=16,
            temperature=0.1,
            batch_size=8,
            generator=torch.Generator().manual_seed(7 + t),
            momentum=0.9,
        )
        for a, b in zip(expected.parameters(), strategy.model.heads.parameters()):
            assert torch.equal(a, b)
    assert sorted(strategy.stats.classes) == sorted(
        int(c) for e in bm.train_stream[:2] for c in e.classes_in_this_experience
    )


def test_competitor_options_are_validated():
    for name, bad in [("der++", {"mem_size": 0}), ("der++", {"alpha": -1}), ("slca", {"backbone_lr_scale": -0.1})]:
        with pytest.raises(ConfigError):
            STRATEGIES[name].options.from_dict(bad)
    assert isinstance(ClassGaussians().params, dict)


def _kill_after(monkeypatch, k):
    from clcompose.bench.runs import checkpoint

    real_save, calls = checkpoint.save, []

    class Killed(Exception):
        pass

    def save_then_die(*args, **kwargs):
        out = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == k:
            raise Killed
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    return Killed


@pytest.mark.parametrize(
    "strategy, options, k",
    [("der++", {"mem_size": 60}, 2), ("slca", {}, 3), ("slca", {"backbone_lr_scale": 1.0, "ewc_lambda": 10.0}, 1)],
)
def test_end_to_end_resume_identical_and_aggregated(strategy, options, k, tmp_path, monkeypatch):
    from clcompose.bench.cli.main import main

    cfg = CONFIG | {"strategy": strategy, "strategy_options": options}
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    m = reference["accuracy_matrix"]
    assert len(m) == 5 and all(m[i][j] == 0.0 for i in range(5) for j in range(i + 1, 5))
    with monkeypatch.context() as patch:
        killed = _kill_after(patch, k)
        with pytest.raises(killed):
            run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    torch.manual_seed(999)
    _, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"] and resumed["metrics"] == reference["metrics"]
    assert [r["from_step"] for r in resumed["resumes"]] == [k]
    assert main(["aggregate", str(tmp_path / "reference"), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "tables" / "split-digits.csv")
    assert table["variant"].str.startswith(strategy).any(), table["variant"].tolist()


def test_slca_beats_naive_on_digits(tmp_path):
    """One-sided: classifier alignment keeps old classes; naive fine-tuning forgets them (seed 4 of CONFIG)."""
    finals = {}
    for name in ("naive", "slca"):
        _, rec = run(CONFIG | {"strategy": name}, runs_dir=tmp_path, progress=False)
        finals[name] = rec["metrics"]["final_average_accuracy"]
    assert finals["slca"] >= finals["naive"] + 0.2, finals
