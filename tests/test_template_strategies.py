"""Template strategies end to end on a tiny task-labelled domain stream, and their pieces against formulas."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from clcompose.bench.runs.run import RunConfig, _Session, run
from clcompose.strategies.core.registry import ConfigError

TINY = {
    "benchmark": "domains",
    "backbone": "template-mixture",
    "benchmark_options": {
        "source": "digits",
        "domains": ["identity", "rot90", "invert"],
        "heldout": "rot180",
        "per_class": 8,
        "test_per_class": 8,
    },
    "backbone_options": {"stem_stride": 2, "blocks": 3, "templates": 2, "width": 4, "expansion": 2, "feature_dim": 8},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05},
    "seed": 3,
    "stream_seed": 1,
}


FAST_TASK_VECTORS = {
    "probe_epochs": 2,
    "align_epochs": 1,
    "align_epochs_per_task": 1,
    "fisher_max_examples": 16,
    "diagnostics_examples": 20,
}


def tiny(strategy: str, **options) -> dict:
    cfg = json.loads(json.dumps(TINY)) | {"strategy": strategy}
    cfg["strategy_options"] = (FAST_TASK_VECTORS if strategy in ("template-ita", "template-iel") else {}) | options
    return cfg


def session(strategy: str, **options) -> _Session:
    return _Session.build(RunConfig.from_dict(tiny(strategy, **options)).resolve())


def test_domain_stream_has_task_labels_offset_classes_and_a_heldout_domain():
    bm = session("template-program").benchmark
    assert [e.task_label for e in bm.train_stream] == [0, 1, 2]
    assert [sorted(e.classes_in_this_experience) for e in bm.test_stream] == [
        list(range(10 * t, 10 * t + 10)) for t in range(3)
    ]
    assert bm.heldout["domain"] == "rot180" and bm.heldout["task_label"] == 3
    assert sorted(bm.heldout["test"].targets.uniques) == list(range(30, 40))
    x0, x2 = bm.test_stream[0].dataset[0][0], bm.test_stream[2].dataset[0][0]
    torch.testing.assert_close(x2, 1 - x0)  # the same test image under every domain


def test_program_transfer_forgets_nothing_and_leaves_the_body_untouched(tmp_path):
    s = session("template-program", ladder=False)
    strategy, body = s.strategy, s.strategy.model.body
    snapshots = []
    for exp in s.steps:
        strategy.train(exp, eval_streams=[])
        task0 = {
            k: v.clone()
            for k, v in [
                *strategy.model.norms["0"].state_dict().items(),
                *strategy.model.heads["0"].state_dict().items(),
            ]
        }
        snapshots.append(
            (
                copy.deepcopy(body.state_dict()),
                {t: p.detach().clone() for t, p in strategy.current_programs().items()},
                task0,
            )
        )
    first_body, first_programs, first_task0 = snapshots[0]
    assert first_task0 and any("running_mean" in k for k in first_task0)
    for later_body, later_programs, later_task0 in snapshots[1:]:
        assert all(torch.equal(first_body[k], later_body[k]) for k in first_body)  # bank, stem and adapter frozen
        assert torch.equal(first_programs[0], later_programs[0])  # earlier programs never move
        assert all(torch.equal(first_task0[k], later_task0[k]) for k in first_task0)  # nor task 0's statistics and head
    _, rec = run(tiny("template-program", ladder=False), runs_dir=tmp_path, progress=False)
    m = rec["accuracy_matrix"]
    assert all(m[i][j] == m[j][j] for j in range(3) for i in range(j, 3))  # every column constant once learned
    assert rec["metrics"]["forgetting"] == 0.0
    assert rec["metrics"]["params_per_task"] == 3 * 2 + 8 * 10 + 10  # ξ_t (L×N) + head


def test_ewc_penalty_and_its_fisher_against_explicit_formulas():
    from clcompose.strategies.templates.ewc import ewc_penalty

    torch.manual_seed(0)
    theta = {"a": torch.randn(3, requires_grad=True), "b": torch.randn(2, 2, requires_grad=True)}
    anchors = [{"a": torch.randn(3), "b": torch.randn(2, 2)} for _ in range(2)]
    fishers = [{"a": torch.rand(3), "b": torch.rand(2, 2)} for _ in range(2)]
    value = ewc_penalty(theta, anchors, fishers, 3.0)
    explicit = 1.5 * sum(
        float((f[n] * (theta[n].detach() - a[n]) ** 2).sum()) for a, f in zip(anchors, fishers) for n in theta
    )
    assert float(value.detach()) == pytest.approx(explicit)
    value.backward()
    closed = 3.0 * sum(f["b"] * (theta["b"] - a["b"]) for a, f in zip(anchors, fishers))
    torch.testing.assert_close(theta["b"].grad, closed.detach())

    from clcompose.strategies.templates.ewc import ewc_proximal

    lr, prime = 0.05, torch.randn(3)
    new = ewc_proximal(prime, [a["a"] for a in anchors], [f["a"] for f in fishers], 3.0, lr)
    stationary = (new - prime) / lr + 3.0 * sum(f["a"] * (new - a["a"]) for a, f in zip(anchors, fishers))
    torch.testing.assert_close(stationary, torch.zeros(3), atol=1e-5, rtol=0)  # zero gradient of the proximal objective

    s = session("template-ewc", scope="bank", fisher_max_examples=5, ladder=False)
    strategy = s.strategy
    strategy.train(s.steps[0], eval_streams=[])
    anchor, fisher = strategy.anchors[0], strategy.fishers[0]
    assert set(fisher) == {n for n, _ in strategy.model.body.named_parameters() if n.startswith("bank.")}
    # the same 5 examples, explicitly: (1/n) Σ_x Σ_c p_c (∂ log p_c / ∂θ)², the network in eval mode
    torch.manual_seed(7)
    strategy.adapted_dataset = s.steps[0][0].dataset.train()
    _, again = strategy.shared_fisher(0)
    torch.manual_seed(7)
    from clcompose.strategies.templates.programs import sample_examples as _sample

    x, _ = _sample(strategy.adapted_dataset, 5, "cpu")
    net = strategy.model.eval()
    params = [p for n, p in net.body.named_parameters() if n.startswith("bank.")]
    names = [n for n, _ in net.body.named_parameters() if n.startswith("bank.")]
    explicit = [torch.zeros_like(p) for p in params]
    for xi in x:
        logp = F.log_softmax(net.heads["0"](net.features(xi[None], 0))[0], dim=0)
        for c in range(len(logp)):
            grads = torch.autograd.grad(logp[c], params, retain_graph=True)
            for e, g in zip(explicit, grads):
                e += logp[c].exp().detach() * g.pow(2) / len(x)
    for n, e in zip(names, explicit):
        torch.testing.assert_close(again[n], e, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(anchor[n], dict(net.body.named_parameters())[n]) for n in anchor)


def test_recalibrated_statistics_are_the_exact_averages():
    from clcompose.strategies.templates.network import (
        ProgramNet,
        TemplateMixtureNet,
        TemplateMixtureOptions,
        recalibrate_statistics,
    )

    torch.manual_seed(0)
    net = ProgramNet(
        TemplateMixtureNet(TemplateMixtureOptions(blocks=1, width=3, expansion=1, stem_stride=2, feature_dim=2))
    )
    x = torch.rand(40, 1, 8, 8)
    recalibrate_statistics(net.norms, net, torch.split(x, 8))
    stem = net.body.stem(x)  # the first site's input does not depend on any normalisation
    torch.testing.assert_close(net.norms.stem.running_mean, stem.mean(dim=(0, 2, 3)))
    per_batch_var = torch.stack([b.var(dim=(0, 2, 3)) for b in torch.split(stem, 8)]).mean(
        0
    )  # unbiased, as BatchNorm keeps
    torch.testing.assert_close(net.norms.stem.running_var, per_batch_var)
    assert net.norms.stem.momentum == 0.1 and not any(p.grad is not None for p in net.parameters())


def test_copy_init_picks_the_program_with_the_best_nearest_mean_accuracy():
    from clcompose.strategies.templates.programs import most_similar_task, nearest_mean_accuracy

    f = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert nearest_mean_accuracy(f, y) == 1.0
    assert nearest_mean_accuracy(torch.zeros(4, 2) + torch.tensor([[0.0], [1.0], [0.0], [1.0]]), y) == 0.5
    s = session("template-program", program_init="copy", ladder=False)
    s.strategy.train(s.steps[0], eval_streams=[])
    s.strategy.train(s.steps[1], eval_streams=[])
    assert s.strategy.copied_from == {1: 0}  # one earlier task: it is the most similar
    assert torch.equal(s.strategy.initial_programs[1], s.strategy.current_programs()[0])  # started as the trained ξ_0
    body = s.strategy.model.body
    x = torch.stack([s.steps[1][0].dataset[i][0] for i in range(16)])
    yy = torch.tensor([int(s.steps[1][0].dataset[i][1]) for i in range(16)])
    programs = {0: torch.zeros(3, 2), 1: torch.tensor([[9.0, -9.0]] * 3)}
    scores = {}
    for t, p in programs.items():
        from clcompose.strategies.templates.network import mixture_of

        scores[t] = nearest_mean_accuracy(body(x, mixture_of(p), body.new_norms().train()), yy)
    assert most_similar_task(body, programs, x, yy) == max(sorted(scores), key=lambda t: scores[t])


def test_template_ita_tunes_only_program_vectors_and_composes_them(tmp_path):
    s = session("template-ita", ladder=False)
    strategy = s.strategy
    assert strategy.pool.names == ["xi"]
    for exp in s.steps[:2]:
        strategy.train(exp, eval_streams=[])
        if strategy.pool.num_tasks == 1:
            frozen = copy.deepcopy(strategy.model.backbone.state_dict())
    after = strategy.model.backbone.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # θ0 (body, ξ0, statistics) fixed after experience 0
    base, deltas = strategy.base_logits(), [strategy.pool.deltas(t)["xi"] for t in range(2)]
    torch.testing.assert_close(strategy.composed_logits(), base + (deltas[0] + deltas[1]) / 2)
    assert strategy.parameter_counts()["params_per_task"] == 3 * 2 + (8 * 10 + 10)


@pytest.mark.parametrize("strategy", ["template-joint", "template-iel", "template-finetune"])
def test_every_template_strategy_runs_and_reports_its_metrics(strategy, tmp_path):
    extra = (
        {"backbone_options": TINY["backbone_options"] | {"sharing": "unshared"}}
        if strategy == "template-finetune"
        else {}
    )
    _, rec = run(tiny(strategy) | extra, runs_dir=tmp_path, progress=False)
    m = rec["metrics"]
    for key in ("ladder_head", "ladder_full", "params_per_task", "shared_params"):
        assert isinstance(m[key], float), key
    if strategy == "template-finetune":  # the unshared network: no programs, no program rung
        assert m["ladder_program"] is None and rec["strategy_extras"]["programs"] is None
        from clcompose.strategies.templates.network import TemplateMixtureNet, TemplateMixtureOptions

        unshared = TemplateMixtureNet(TemplateMixtureOptions(**extra["backbone_options"]))
        assert unshared.n_templates == 3 and m["shared_params"] == sum(p.numel() for p in unshared.parameters())
    else:
        assert 0 <= m["mixture_entropy_final"] <= 1 and 0 <= m["template_overlap"] <= 1
        assert len(rec["strategy_extras"]["programs"]["mixtures"]) == 3
    if strategy == "template-joint":
        assert len(rec["accuracy_matrix"]) == 1 and m["forgetting"] is None
    if strategy == "template-iel":
        assert 0 <= m["task_aware_accuracy"] <= 1
        # one diagnostics row per experience holding both IEL's second-order rows and the programs' rows
        rows = rec["strategy_extras"]["diagnostics"]
        assert [r["tasks"] for r in rows] == [1, 2, 3]
        assert all({"jensen_gap", "mixture_entropy", "composed_entropy"} <= set(r) for r in rows), rows
        # before training = ξ0's U[0, 1) draw (near-uniform), not the trained ξ0
        assert m["mixture_entropy_init"] > 0.9 and m["mixture_entropy_base"] <= 1


def test_resumed_template_runs_are_identical(tmp_path, monkeypatch):
    from tests.test_resume import Killed, kill_after

    for strategy, k in (("template-ewc", 1), ("template-ita", 2)):
        cfg = tiny(strategy)
        cfg["train"]["epochs"] = 1
        _, reference = run(cfg, runs_dir=tmp_path / f"{strategy}-ref", progress=False)
        with monkeypatch.context() as m:
            kill_after(m, k)
            with pytest.raises(Killed):
                run(cfg, runs_dir=tmp_path / f"{strategy}-cut", progress=False)
        torch.manual_seed(999)
        _, resumed = run(cfg, runs_dir=tmp_path / f"{strategy}-cut", progress=False)
        assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
        assert resumed["metrics"] == reference["metrics"]  # ladder and program metrics included
        assert resumed["resumes"][0]["from_step"] == k


def test_template_strategies_need_the_template_backbone():
    with pytest.raises(ConfigError, match="template-mixture backbone"):
        _Session.build(
            RunConfig.from_dict(
                tiny("template-program")
                | {
                    "backbone": "small-cnn",
                    "backbone_options": {"source": "digits", "pretrain_epochs": 1, "input_size": 8},
                }
            ).resolve()
        )
    with pytest.raises(ConfigError, match="sharing must be 'templates'"):
        _Session.build(
            RunConfig.from_dict(
                tiny("template-ita") | {"backbone_options": TINY["backbone_options"] | {"sharing": "unshared"}}
            ).resolve()
        )
    with pytest.raises(ConfigError, match="must be 'xi'"):
        RunConfig.from_dict(tiny("template-ita", layers="all")).resolve()
    with pytest.raises(ConfigError, match="heldout must not be one of"):
        RunConfig.from_dict(
            tiny("template-program") | {"benchmark_options": {"domains": ["identity", "rot90"], "heldout": "rot90"}}
        ).resolve()


def test_sweep_backbone_overrides_per_strategy(tmp_path):
    from clcompose.bench.sweeps.sweep import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("""
name: t
seeds: 1
benchmarks: {domains: {source: digits}}
backbones: {template-mixture: {blocks: 2}}
strategies:
  template-joint: {backbone: {sharing: {grid: [templates, unshared]}}}
  template-program: {}
train: {epochs: 1}
""")
    cells = load_sweep(path, runs_dir=tmp_path / "runs").cells
    options = [(c.config["strategy"], c.config["backbone_options"]) for c in cells]
    assert options == [
        ("template-joint", {"blocks": 2, "sharing": "templates"}),
        ("template-joint", {"blocks": 2, "sharing": "unshared"}),
        ("template-program", {"blocks": 2}),
    ]
    path.write_text(path.read_text().replace("template-program: {}", "template-program: {backbone: tiny}"))
    with pytest.raises(ConfigError, match="template-program.backbone must be a mapping"):
        load_sweep(path, runs_dir=tmp_path / "runs")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_proximal_ewc_with_the_optimisers_settles_at_the_ewc_optimum(optimizer):
    """Loss ½a(θ − c)² + penalty (λ/2)F(θ − θ*)²: the optimiser's steps with the proximal step after each must
    settle at the penalised optimum (ac + λFθ*)/(a + λF), whatever momentum or Adam's scaling did to the step."""
    from clcompose.strategies.core.training import TrainConfig
    from clcompose.strategies.templates.ewc import ewc_proximal, proximal_step_size
    from clcompose.strategies.templates.programs import optimizer_for

    a, c = torch.tensor([1.0, 4.0, 0.5]), torch.tensor([2.0, -1.0, 3.0])
    lam, fisher, anchor = 2.0, torch.tensor([1.0, 0.5, 4.0]), torch.tensor([0.0, 1.0, -1.0])
    optimum = (a * c + lam * fisher * anchor) / (a + lam * fisher)
    theta = torch.nn.Parameter(torch.zeros(3))
    lr = 0.05 if optimizer == "sgd" else 0.01
    opt = optimizer_for([([theta], 1.0)], TrainConfig(optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=0.0))
    for _ in range(3000):
        opt.zero_grad()
        (0.5 * a * (theta - c) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            theta.copy_(ewc_proximal(theta, [anchor], [fisher], lam, proximal_step_size(opt, theta)))
    torch.testing.assert_close(theta.detach(), optimum, atol=0.03, rtol=0)


def test_ewc_on_the_bank_trains_only_templates_programs_and_heads_after_the_first_experience():
    s = session("template-ewc", scope="bank", fisher_max_examples=5, ladder=False)
    strategy, body = s.strategy, s.strategy.model.body
    strategy.train(s.steps[0], eval_streams=[])
    before = {n: p.detach().clone() for n, p in body.named_parameters()}
    strategy.train(s.steps[1], eval_streams=[])
    after = dict(body.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("bank.") for n in moved), moved  # stem and adapter frozen, templates train
