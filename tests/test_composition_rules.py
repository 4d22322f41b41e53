"""`composition` of the task-vector strategies: each rule through the model against merging.py on deltas
materialised by hand, the defaults against θ0 + (1/T)Σ τ_t, the selection on held-out data, the diagnostics."""

import copy

import pytest
import torch
from torch import nn

from clcompose.bench.runs.run import run
from clcompose.strategies.task_vectors import merging
from clcompose.strategies.task_vectors.composable import ComposableNet
from clcompose.strategies.task_vectors.composition import Composition
from tests.test_ita_iel import config
from tests.test_regularizers import tiny_model


def net_with_tasks(style: str, n: int = 3) -> ComposableNet:
    backbone = nn.Sequential(*list(tiny_model().children())[:-1])
    net = ComposableNet(backbone, 5, style=style, rank=2, layers="all")
    g = torch.Generator().manual_seed(1)
    for t in range(n):
        net.pool.add_task()
        net.heads.add_head([2 * t, 2 * t + 1])
        for p in net.pool.task_parameters(t):
            p.data.add_(0.3 * torch.randn(p.shape, generator=g))
        net.pool.freeze(t)
    return net


def hand_deltas(net: ComposableNet) -> list[dict[str, torch.Tensor]]:
    """ΔW_t written out per parametrisation: D, B A (reshaped), W0 ⊙ (l − 1) per output row."""
    params = dict(net.pool.model.named_parameters())
    out = []
    for mods in net.pool.vectors:
        d = {}
        for name, m in zip(net.pool.names, mods):
            w0 = params[name].detach()
            if net.pool.style == "full":
                d[name] = m.delta.detach().clone()
            elif net.pool.style == "lora":
                d[name] = (m.B.detach() @ m.A.detach()).reshape(w0.shape)
            else:
                d[name] = w0 * (m.scale.detach().reshape(-1, *[1] * (w0.dim() - 1)) - 1)
        out.append(d)
    return out


def eval_weights(net: ComposableNet, comp: Composition) -> dict[str, torch.Tensor]:
    net.composition = comp
    net.invalidate()
    net.eval()
    return net.backbone_weights()


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_each_rule_through_the_model_equals_merging_on_the_hand_materialised_deltas(style):
    net = net_with_tasks(style)
    taus = hand_deltas(net)
    base = {n: w.detach() for n, w in net.pool.base_weights().items()}
    g = torch.Generator().manual_seed(3)
    fishers = [{n: torch.rand(w.shape, generator=g) for n, w in base.items()} for _ in taus]
    expected = {
        "ties": {n: 0.7 * d for n, d in merging.ties_merge(taus, 0.4).items()},
        "magmax": {n: 0.7 * d for n, d in merging.magmax_merge(taus).items()},
        "fisher": merging.fisher_merge(taus, fishers),  # a weighted average: no λ
    }
    for rule, delta in expected.items():
        w = eval_weights(net, Composition(rule, scale=0.7, density=0.4, fishers=fishers))
        for n in net.pool.names:
            torch.testing.assert_close(w[n], base[n] + delta[n], rtol=1e-6, atol=1e-7)
    # the defaults: average θ0 + (1/T)Σ τ_t and the λ-sum θ0 + λ Σ τ_t
    w = eval_weights(net, Composition("average"))
    for n in net.pool.names:
        torch.testing.assert_close(w[n], base[n] + sum(t[n] for t in taus) / 3, rtol=1e-6, atol=1e-7)
    net.coefficients = [0.4] * 3
    w = eval_weights(net, Composition("sum"))
    for n in net.pool.names:
        torch.testing.assert_close(w[n], base[n] + 0.4 * sum(t[n] for t in taus), rtol=1e-6, atol=1e-7)


def test_the_composed_forward_is_a_copied_network_with_the_merged_weights_and_is_materialised_once():
    net = net_with_tasks("lora")
    w = eval_weights(net, Composition("ties", scale=1.0, density=0.3))
    clone = copy.deepcopy(net.pool.model)
    state = clone.state_dict() | {n: v.detach() for n, v in w.items()}
    clone.load_state_dict(state)
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(net.features(x), clone(x))
    calls = []
    real = merging.ties_merge
    try:
        merging.ties_merge = lambda *a, **k: calls.append(1) or real(*a, **k)
        net.invalidate()
        for _ in range(5):
            net(x)
    finally:
        merging.ties_merge = real
    assert len(calls) == 1  # once per evaluation, not per forward


def test_tangent_composition_is_the_linearised_network_by_finite_differences():
    net = net_with_tasks("full").double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    net.composition = Composition("tangent")
    net.invalidate()
    net.eval()
    taus = hand_deltas(net)
    direction = {n: sum(t[n] for t in taus) / 3 for n in net.pool.names}
    base = {n: w.detach() for n, w in net.pool.base_weights().items()}
    h = 1e-5
    plus = net.pool.forward_with({n: base[n] + h * direction[n] for n in base}, x)
    minus = net.pool.forward_with({n: base[n] - h * direction[n] for n in base}, x)
    f0 = net.pool.forward_with(base, x)
    torch.testing.assert_close(net.features(x), f0 + (plus - minus) / (2 * h), rtol=1e-7, atol=1e-8)
    # linear in τ: the composed features are exactly the mean of the individual linearised features
    mean = sum(net.individual_features(t, x) for t in range(3)) / 3
    torch.testing.assert_close(net.features(x), mean)


def test_invalid_composition_options_are_clear_errors():
    from clcompose.strategies.core.registry import STRATEGIES, ConfigError

    with pytest.raises(ConfigError, match="composition must be one of"):
        STRATEGIES["ita"].options.from_dict({"composition": "median"})
    with pytest.raises(ConfigError, match="ties_density_grid must hold values in"):
        STRATEGIES["iel"].options.from_dict({"ties_density_grid": [0.0]})
    opts = STRATEGIES["task-arithmetic"].options.from_dict({"composition": "fisher", "merge_fisher": "stored"})
    with pytest.raises(ConfigError, match="merge_fisher=task"):
        STRATEGIES["task-arithmetic"].factory(ComposableNet(tiny_model(), 4), opts, None)


# ---------------------------------------------------------------------------------------------- through bench run
def recompute(run_dir, rule: str, lam: float = 1.0, density: float = 0.2) -> list[float]:
    """The last accuracy row from the saved task vectors and heads, composed by hand with merging.py."""
    from clcompose.bench.cli.skills import load_run

    _, net, batches = load_run(run_dir)
    taus = hand_deltas(net)
    base = {n: w.detach() for n, w in net.pool.base_weights().items()}
    t = len(taus)
    if rule == "average":
        delta = {n: sum(tau[n] for tau in taus) / t for n in base}
    elif rule == "sum":
        delta = {n: lam * sum(tau[n] for tau in taus) for n in base}
    elif rule == "ties":
        delta = {n: lam * d for n, d in merging.ties_merge(taus, density).items()}
    else:
        delta = {n: lam * d for n, d in merging.magmax_merge(taus).items()}
    weights = {n: base[n] + delta[n] for n in base}
    hits, counts = [0] * t, [0] * t
    with torch.no_grad():
        for e, x, y in batches:
            pred = net.heads(net.pool.forward_with(weights, x)).argmax(1)
            hits[e] += int((pred == y).sum())
            counts[e] += len(y)
    return [h / c for h, c in zip(hits, counts)]


@pytest.mark.parametrize(
    "strategy, rule", [("ita", "average"), ("task-arithmetic", "sum"), ("iel", "ties"), ("task-arithmetic", "magmax")]
)
def test_a_run_evaluates_the_rule_on_its_task_vectors(strategy, rule, tmp_path):
    path, rec = run(
        config(strategy, composition=rule, lambda_grid=[0.5, 1.0], ties_density_grid=[0.2, 0.5]),
        runs_dir=tmp_path,
        progress=False,
    )
    chosen = (rec["strategy_extras"]["lambda"] or [{}])[-1]
    if rule in ("sum", "ties", "magmax"):
        assert chosen["lambda"] in (0.5, 1.0) and chosen["val_examples"] == 24  # held out of training
        assert ("density" in chosen) == (rule == "ties")
    else:
        assert rec["strategy_extras"]["lambda"] is None
    expected = recompute(path.parent, rule, chosen.get("lambda", 1.0), chosen.get("density", 0.2))
    assert rec["accuracy_matrix"][-1] == pytest.approx(expected, abs=1e-9)
    diag = rec["strategy_extras"]["diagnostics"][-1]
    assert diag["gap_definition"] == ("merged" if rule in ("ties", "magmax") else "weighted")
    seconds = rec["strategy_extras"]["diagnostics_seconds"]
    assert [s["tasks"] for s in seconds] == [1, 2, 3] and all(s["seconds"] > 0 for s in seconds)


@pytest.mark.parametrize("strategy, source", [("ita", "stored"), ("task-arithmetic", "task")])
def test_fisher_merging_runs_with_each_fisher_source(strategy, source, tmp_path):
    _, rec = run(config(strategy, composition="fisher", merge_fisher=source), runs_dir=tmp_path, progress=False)
    assert rec["config"]["strategy_options"]["merge_fisher"] == source
    assert rec["metrics"]["final_average_accuracy"] > 1 / 6
    assert rec["strategy_extras"]["diagnostics"][-1]["gap_definition"] == "merged"


# ---------------------------------------------------------------------------------------------- diagnostics
def test_the_affine_gap_identity_on_a_quadratic_with_the_sum_weights():
    from clcompose.strategies.task_vectors.diagnostics import fisher_weighted_spread, jensen_gap

    g = torch.Generator().manual_seed(0)
    h, grad = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.randn(6, generator=g, dtype=torch.float64)
    taus = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def loss(tau):  # L(θ0 + τ) = 2 + g·τ + ½ τᵀ diag(h) τ
        return float(2 + grad @ tau + 0.5 * (h * tau * tau).sum())

    lam = 0.7  # task arithmetic's λ-sum: weights λ, θ0 enters with 1 − 3λ
    tau_p = lam * taus.sum(0)
    gap = jensen_gap(
        [loss(torch.zeros(6, dtype=torch.float64)), *[loss(t) for t in taus]], loss(tau_p), [1 - 3 * lam] + [lam] * 3
    )
    with_base = torch.cat([torch.zeros(1, 6, dtype=torch.float64), taus])
    assert gap == pytest.approx(fisher_weighted_spread(with_base, [1 - 3 * lam] + [lam] * 3, h), rel=1e-10)


def test_a_sum_run_records_the_gap_with_its_own_weights(tmp_path):
    _, rec = run(config("task-arithmetic", composition="sum", lambda_grid=[0.3]), runs_dir=tmp_path, progress=False)
    d = rec["strategy_extras"]["diagnostics"][-1]
    assert d["weights"] == [0.3] * 3 and d["gap_definition"] == "weighted"
    by_hand = (1 - 0.9) * d["base_loss"] + sum(0.3 * v for v in d["individual_losses"]) - d["composed_loss"]
    assert d["jensen_gap"] == pytest.approx(by_hand, abs=1e-9)


def test_diagnostics_reuse_the_features_of_frozen_task_models(monkeypatch):
    from clcompose.strategies.task_vectors.diagnostics import DiagnosticsCache, second_order_diagnostics

    net = net_with_tasks("lora", 2)
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(7, 2, 6, 6, generator=g), torch.randint(2 * e, 2 * e + 2, (7,), generator=g), e) for e in range(3)
    ]
    cache = DiagnosticsCache()
    second_order_diagnostics(net, [b for b in batches if b[2] < 2], cache=cache)
    net.pool.add_task()
    net.heads.add_head([4, 5])
    for p in net.pool.task_parameters(2):
        p.data.add_(0.3)
    net.pool.freeze(2)
    net.invalidate()
    calls = []
    real = net.pool.forward_with
    monkeypatch.setattr(net.pool, "forward_with", lambda *a, **k: calls.append(1) or real(*a, **k))
    cached = second_order_diagnostics(net, batches, cache=cache)
    # composed on 3 experiences + the new task on 3 + the old tasks on the new experience: 8, not 3 + 9
    assert len(calls) == 8
    fresh = second_order_diagnostics(net, batches)
    assert cached["individual_losses"] == pytest.approx(fresh["individual_losses"], abs=1e-12)
    assert cached["jensen_gap"] == pytest.approx(fresh["jensen_gap"], abs=1e-12)
