"""`preset: reference` against the reference code's rules, each written out by hand here (never the code's output).

The reference is mammoth's ``second_order`` model: its update (AdamW on the CE loss accumulated over 16
mini-batches, the first step of an epoch after 17, then the decoupled plain-SGD regulariser step scaled by the
cosine factor and clipped per parameter at 100, applied before AdamW's step), its LoRA initialisation, and its
pre-consolidation loops (linear probe, classifier alignment, diagonal Gaussian mixture).
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clcompose.strategies.core.heads import ClassIncrementalNet, ExperienceHeads
from clcompose.strategies.core.training import TrainConfig, is_step_iteration
from clcompose.strategies.task_vectors.consolidation import ClassGaussians, align_classifier, linear_probe
from clcompose.strategies.task_vectors.gmm import fit_reference_gmm, kmeans_init
from clcompose.strategies.task_vectors.iel import IEL
from clcompose.strategies.task_vectors.ita import ITA
from clcompose.strategies.task_vectors.options import IELOptions, ITAOptions, TaskArithmeticOptions
from clcompose.strategies.task_vectors.pool import LoRADelta, TaskVectorPool


# ---------------------------------------------------------------------- the preset as options
def test_preset_sets_the_reference_options_and_explicit_values_win():
    o = ITAOptions.from_dict({"preset": "reference"})
    assert (o.reg_step, o.head_init, o.align_trained_heads, o.anchor_source) == (
        "decoupled",
        "random",
        False,
        "persistent",
    )
    assert (o.probe_epochs, o.probe_batch_size, o.probe_momentum, o.probe_drop_last) == (3, 128, 0.0, True)
    assert (o.align_momentum, o.gaussian_components, o.gmm_fit, o.gmm_iterations) == (0.0, 5, "reference", 500)
    assert (o.fisher, o.fisher_max_examples, o.qkv_rank_multiplier, o.clip_grad) == ("exact", None, 3, 100.0)
    assert o.head_fisher_classes == "all" and IELOptions(preset="reference").head_fisher_classes == "past"
    assert TaskArithmeticOptions(preset="reference").composition == "average"
    # an explicit value wins, also when it equals the suite's default; the hyperparameters stay the user's
    o = ITAOptions.from_dict({"preset": "reference", "probe_epochs": 20, "reg_step": "coupled", "alpha": 0.02})
    assert (o.probe_epochs, o.reg_step, o.alpha, o.rank) == (20, "coupled", 0.02, 4)
    assert ITAOptions(preset="reference", fisher="sampled").fisher == "sampled"
    # the expanded options reproduce themselves (the recorded config resolves to the same run)
    assert ITAOptions.from_dict(o.to_dict()) == o
    assert ITAOptions().reg_step == "proximal" and ITAOptions().probe_epochs == 20  # no preset: the suite's defaults


def test_the_preset_decides_an_unset_virtual_batch_and_an_explicit_one_wins():
    assert ITAOptions(preset="reference").train_value("virtual_batch", None) == 16
    assert ITAOptions(preset="reference").train_value("virtual_batch_quirk", None) is True
    assert ITAOptions(preset="reference").train_value("virtual_batch", 1) == 1
    assert ITAOptions().train_value("virtual_batch", None) == 1
    assert ITAOptions().train_value("virtual_batch_quirk", None) is False


def test_virtual_batch_schedule_and_the_reference_first_step_quirk():
    def steps(n, v, quirk):
        return [i for i in range(n) if is_step_iteration(i, v, quirk)]

    # the reference: `(it > 0 or V == 1) and it % V == 0`, the counter restarting every epoch
    assert steps(40, 16, True) == [16, 32]  # first step after 17 mini-batches, then every 16
    assert steps(17, 16, True) == [16] and steps(16, 16, True) == []  # an epoch of ≤ 16 never steps
    assert steps(40, 16, False) == [15, 31]
    assert steps(5, 1, True) == steps(5, 1, False) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------- LoRA's A
@pytest.mark.parametrize("rank, out", [(16, 768), (48, 2304)])
def test_lora_a_is_initialised_as_the_reference_does(rank, out):
    """The reference: kaiming_uniform_(a=√5) on a (1, r, fan_in) tensor → bound 1/√(r·fan_in), Var 1/(3 r fan_in)."""
    fan_in = 768
    torch.manual_seed(3)
    mod = LoRADelta(torch.zeros(out, fan_in), rank)
    torch.manual_seed(3)
    reference = torch.empty(1, rank, fan_in)
    nn.init.kaiming_uniform_(reference, a=math.sqrt(5))
    assert torch.equal(mod.A.detach(), reference[0]) and not mod.B.any()
    bound = 1 / math.sqrt(rank * fan_in)
    a = mod.A.detach().double()
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.999 * bound
    assert float(a.var()) == pytest.approx(1 / (3 * rank * fan_in), rel=0.03)
    assert float(a.mean()) == pytest.approx(0.0, abs=4 * bound / math.sqrt(3 * a.numel()))


def test_qkv_gets_three_times_the_rank():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(12, 36)
            self.attn.proj = nn.Linear(12, 12)

    net = nn.Module()
    net.blocks = nn.ModuleList([Block()])
    pool = TaskVectorPool(net, layers="linear", style="lora", rank=2, qkv_rank_multiplier=3)
    pool.add_task()
    ranks = {n: m.A.shape[0] for n, m in zip(pool.names, pool.vectors[0])}
    assert ranks == {"blocks.0.attn.qkv.weight": 6, "blocks.0.attn.proj.weight": 2}


# ---------------------------------------------------------------------- the update rule, step for step
def toy_stream(per_class: int = 36):
    from avalanche.benchmarks import class_incremental_benchmark
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for c in range(4):
        xs.append(2 * torch.randn(6, generator=g) + torch.randn(per_class, 6, generator=g))
        ys.append(torch.full((per_class,), c))
    x, y = torch.cat(xs), torch.cat(ys)
    ds = TensorDataset(x, y)
    ds.targets = y
    return class_incremental_benchmark({"train": ds, "test": ds}, class_order=[0, 1, 2, 3], num_classes_per_exp=[2, 2])


class Capture:
    """Records what the rule takes as given: the state when experience 1 starts, and the mini-batches it sees."""

    def __init__(self):
        self.start, self.batches = None, []

    def before_training_exp(self, strategy, **kwargs):
        if strategy.task == 1:
            self.start = {
                "params": [p.detach().clone() for p in strategy.pool.task_parameters(1)],
                "head": [p.detach().clone() for p in strategy.model.heads.heads[1].parameters()],
                "anchor": [p.detach().clone() for p in strategy.anchor.heads[1].parameters()],
                "head_fisher": {k: v.clone() for k, v in strategy.head_fisher.items()},
                "sums": [{k: v.clone() for k, v in s.items()} for s in strategy.fisher.sums],
                "counts": list(strategy.fisher.counts),
                "past": [p.detach().clone() for p in strategy.pool.task_parameters(0)],
            }

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.task == 1:
            self.batches.append((strategy.clock.train_exp_epochs, strategy.mb_x.clone(), strategy.mb_y.clone()))

    def __getattr__(self, name):  # every other plugin callback: nothing to do
        if name.startswith(("before_", "after_")):
            return lambda *a, **k: None
        raise AttributeError(name)


def _evaluator():
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EvaluationPlugin(loggers=[])


def backbone() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    net.out_features = 5
    return net


def hand_written_reference(net, cap, method, tuning, coeff, clip, lr, epochs, v=16):
    """The reference's loop for experience 1 (ITA: θ0 + τ_1 alone; IEL: θ0 + (τ_0 + τ_1)/2), from its rules."""
    start = cap.start
    params = [p.clone().requires_grad_(True) for p in start["params"]]
    head = [p.clone().requires_grad_(True) for p in start["head"]]
    past = start["past"]
    w0 = [net[0].weight.detach(), net[2].weight.detach()]
    biases = [net[0].bias.detach(), net[2].bias.detach()]
    eps = 1e-5
    if method == "ita":  # F̂ = (ε + U_0) / N_0: the Fisher of the past experience
        fisher = [(eps + start["sums"][0][f"{k}.weight"]) / start["counts"][0] for k in ("0", "2")]
    else:  # F̄ = ε + (U_0 + U_1) / (N_0 + N_1): cumulative, current included
        n = sum(start["counts"])
        fisher = [eps + (start["sums"][0][f"{k}.weight"] + start["sums"][1][f"{k}.weight"]) / n for k in ("0", "2")]

    def deltas(ps):
        return list(ps) if tuning == "full" else [ps[1] @ ps[0], ps[3] @ ps[2]]

    def forward(x):
        cur = deltas(params)
        if method == "iel":
            old = deltas(past)
            cur = [(o + c) / 2 for o, c in zip(old, cur)]
        h = F.relu(F.linear(x, w0[0] + cur[0], biases[0]))
        return F.linear(F.linear(h, w0[1] + cur[1], biases[1]), head[0], head[1])  # current head: past at −inf

    opt = torch.optim.AdamW(params + head, lr=lr, weight_decay=0.0)
    it, epoch = 0, -1
    for e, x, y in cap.batches:
        if e != epoch:  # a new epoch: CosineSchedule's lr and a fresh iteration counter
            epoch, it = e, 0
            factor = 1.0 if e == 0 else math.cos(99 * math.pi * e / (200 * (epochs - 1)))
            for g in opt.param_groups:
                g["lr"] = lr * factor
        if it == 0:
            opt.zero_grad()
        loss = F.cross_entropy(forward(x), y - 2) / v  # classes 2, 3 are the current head's 0, 1
        loss.backward()
        if it > 0 and it % v == 0:
            with torch.no_grad():
                tau = deltas(params)
                if method == "ita":
                    G = [coeff * f * t for f, t in zip(fisher, tau)]
                else:  # β F̄ [(1 − 1/T) τ_T − (1/T) Σ_{s<T} τ_s], T = 2
                    G = [coeff * f * (0.5 * t - 0.5 * o) for f, t, o in zip(fisher, tau, deltas(past))]
                if tuning == "full":
                    reg = G
                else:  # ∂/∂A = Bᵀ G, ∂/∂B = G Aᵀ
                    reg = [params[1].T @ G[0], G[0] @ params[0].T, params[3].T @ G[1], G[1] @ params[2].T]
                diff = [h - a for h, a in zip(head, start["anchor"])]
                hf = [start["head_fisher"]["weight"], start["head_fisher"]["bias"]]
                # req · Σ (F + ε) d² + l2 · Σ d², req = α/β, l2 = 0.001 (no ½)
                reg_head = [2 * coeff * (f + eps) * d + 2 * 0.001 * d for f, d in zip(hf, diff)]
                for p, g in zip(params + head, reg + reg_head):
                    g = g * min(1.0, clip / (float(g.norm()) + 1e-6))  # clip_grad_norm_(p, clip)
                    p -= factor * g
            opt.step()
            opt.zero_grad()
        it += 1
    return [p.detach() for p in params], [p.detach() for p in head]


@pytest.mark.parametrize("method", ["ita", "iel"])
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_preset_reference_matches_the_hand_written_reference_update(method, tuning):
    epochs, lr, coeff, clip = 3, 0.01, 50.0, 0.02  # a small clip, so that it acts on some steps
    bench = toy_stream()
    net = backbone()
    cap = Capture()
    cls, opts = (ITA, ITAOptions) if method == "ita" else (IEL, IELOptions)
    strength = {"alpha": coeff} if method == "ita" else {"beta": coeff}
    options = opts(preset="reference", tuning=tuning, rank=2, clip_grad=clip, diagnostics=False, **strength)
    strategy = cls(
        model=ClassIncrementalNet(net),
        options=options,
        train=TrainConfig(epochs=epochs, batch_size=2, optimizer="adamw", lr=lr),
        evaluator=_evaluator(),
        plugins=[cap],
    )
    assert strategy.virtual_batch == 16 and strategy.virtual_batch_quirk
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[])
    # 36 mini-batches an epoch: steps after mini-batches 17 and 33, 3 epochs
    assert strategy.step_counts == [6, 6] and len(cap.batches) == 3 * 36
    params, head = hand_written_reference(net, cap, method, tuning, coeff, clip, lr, epochs)
    for mine, ref in zip(strategy.pool.task_parameters(1), params):
        torch.testing.assert_close(mine.detach(), ref, rtol=0, atol=1e-6)
    for mine, ref in zip(strategy.model.heads.heads[1].parameters(), head):
        torch.testing.assert_close(mine.detach(), ref, rtol=0, atol=1e-6)
    moved = max(float((p - p0).abs().max()) for p, p0 in zip(params, cap.start["params"]))
    assert moved > 1e-3  # the comparison is not between two untrained copies


def test_the_persistent_pretuning_classifier_is_the_anchor_and_leaves_the_trained_heads_alone():
    bench = toy_stream()
    strategy = ITA(
        model=ClassIncrementalNet(backbone()),
        options=ITAOptions(preset="reference", tuning="full", alpha=1.0, diagnostics=False),
        train=TrainConfig(epochs=2, batch_size=2, optimizer="adamw", lr=0.01),
        evaluator=_evaluator(),
    )
    strategy.train(bench.train_stream[0], eval_streams=[])
    trained0 = [p.detach().clone() for p in strategy.model.heads.heads[0].parameters()]
    strategy.train(bench.train_stream[1], eval_streams=[])
    assert strategy.pretuning is strategy.anchor and len(strategy.pretuning.heads) == 2
    # the trained head of experience 0 stays as trained (align_trained_heads=false) …
    assert all(torch.equal(a, b) for a, b in zip(trained0, strategy.model.heads.heads[0].parameters()))
    # … while the anchor's is the pre-tuning classifier's, re-aligned: not the trained one
    assert not torch.equal(strategy.anchor.heads[0].weight, strategy.model.heads.heads[0].weight)


# ---------------------------------------------------------------------- pre-consolidation loops on toy features
def toy_features(n_per_class=150, d=5, classes=(0, 1, 2, 3)):
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([torch.randn(d, generator=g) + 0.5 * torch.randn(n_per_class, d, generator=g) for _ in classes])
    labels = torch.cat([torch.full((n_per_class,), c) for c in classes])
    return feats, labels


def two_heads(d=5) -> ExperienceHeads:
    torch.manual_seed(2)
    heads = ExperienceHeads(d)
    heads.add_head([0, 1])
    heads.add_head([2, 3])
    return heads


def test_linear_probe_is_the_reference_loop():
    """Plain SGD (lr 0.01) on CE with past logits at −inf, all heads in the optimiser, 3 epochs, reshuffled
    batches of 128 with drop_last; only the current classes' examples."""
    feats, labels = toy_features()
    keep = labels >= 2
    feats, labels = feats[keep], labels[keep]
    mine = two_heads()
    linear_probe(mine, 1, feats, labels, 3, 0.01, 128, torch.Generator().manual_seed(5), momentum=0.0, drop_last=True)

    ref = two_heads()
    opt = torch.optim.SGD(list(ref.parameters()), lr=0.01)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(labels) - 127, 128):  # drop_last: 300 examples → 2 batches
            idx = order[i : i + 128]
            logits = torch.cat([h(feats[idx]) for h in ref.heads], dim=1)
            logits[:, :2] = -float("inf")
            opt.zero_grad()
            F.cross_entropy(logits, labels[idx]).backward()
            opt.step()
    for a, b in zip(mine.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert torch.equal(mine.heads[0].weight, two_heads().heads[0].weight)  # the past head never moves


def test_classifier_alignment_is_the_reference_loop():
    """Plain SGD (lr 0.01) on all heads, CosineAnnealingLR(T_max = E) stepped per epoch, 256 fresh samples per
    class each epoch, reshuffled batches of 128 with drop_last, CE on logits / (0.1 (‖logits‖ + 1e-7))."""
    feats, labels = toy_features()
    stats = ClassGaussians(1)
    stats.fit(feats, labels)
    epochs = 4
    mine = two_heads()
    align_classifier(
        mine, stats, epochs, 0.01, 256, 0.1, 128, torch.Generator().manual_seed(7), momentum=0.0, drop_last=True
    )

    ref = two_heads()
    opt = torch.optim.SGD(list(ref.parameters()), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(7)
    for _ in range(epochs):
        x, y = stats.sample([0, 1, 2, 3], 256, g)
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 127, 128):
            idx = order[i : i + 128]
            logits = torch.cat([h(x[idx]) for h in ref.heads], dim=1)
            logits = logits / (0.1 * (torch.norm(logits, p=2, dim=-1, keepdim=True) + 1e-7))
            opt.zero_grad()
            F.cross_entropy(logits, y[idx]).backward()
            opt.step()
        sched.step()
    for a, b in zip(mine.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_alignment_on_the_stacked_heads_is_bit_identical_to_training_each_head_and_leaves_frozen_ones():
    """align_classifier trains one stacked copy of the heads: bit for bit the loop that concatenates the heads
    at every step and steps each head's own parameters (momentum SGD, cosine lr), and a parameter that does not
    require grad keeps its exact values, as SGD skipping it would."""
    feats, labels = toy_features(classes=(0, 1, 2, 3, 4, 5))
    stats = ClassGaussians(1)
    stats.fit(feats, labels)

    def three_heads():
        heads = two_heads()
        heads.add_head([4, 5])
        heads.heads[1].weight.requires_grad_(False)  # a frozen weight (its bias still trains)
        return heads

    epochs, lr = 3, 0.05
    mine = three_heads()
    align_classifier(mine, stats, epochs, lr, 64, 0.1, 32, torch.Generator().manual_seed(3), momentum=0.9)

    ref = three_heads()
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        x, y = stats.sample(list(range(6)), 64, g)
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = order[i : i + 32]
            weight = torch.cat([h.weight for h in ref.heads])
            bias = torch.cat([h.bias for h in ref.heads])
            logits = F.linear(x[idx], weight, bias)
            logits = logits / (0.1 * (logits.norm(dim=-1, keepdim=True) + 1e-7))
            opt.zero_grad()
            F.cross_entropy(logits, y[idx]).backward()
            opt.step()
    for a, b in zip(mine.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(mine.heads[1].weight, three_heads().heads[1].weight)
    assert not torch.equal(mine.heads[1].bias, three_heads().heads[1].bias)


def reference_em(x, mu, n_iter, eps=1e-6, delta=1e-3):
    """The reference's GaussianMixture.fit (diag) from given means, restated: π = 1/k, σ² = 1, then
    `while i <= n_iter and j >= delta` EM steps, with its density using rsqrt(var) as the precision."""
    x = x.double().unsqueeze(1)  # (n, 1, d)
    k, d = mu.shape
    mu = mu.double().unsqueeze(0)
    var = torch.ones_like(mu)
    pi = torch.full((1, k, 1), 1.0 / k, dtype=torch.float64)

    def log_prob(mu, var):
        prec = torch.rsqrt(var)
        log_p = torch.sum((mu * mu + x * x - 2 * x * mu) * prec, dim=2, keepdim=True)
        log_det = torch.sum(torch.log(prec), dim=2, keepdim=True)
        return -0.5 * (d * math.log(2.0 * math.pi) + log_p - log_det)

    ll, i, j = -math.inf, 0, math.inf
    while i <= n_iter and j >= delta:
        weighted = log_prob(mu, var) + torch.log(pi)
        resp = torch.exp(weighted - torch.logsumexp(weighted, dim=1, keepdim=True))
        p = torch.sum(resp, dim=0, keepdim=True) + eps
        mu = torch.sum(resp * x, dim=0, keepdim=True) / p
        x2 = (resp * x * x).sum(0, keepdim=True) / p
        xmu = (resp * mu * x).sum(0, keepdim=True) / p
        var = x2 - 2 * xmu + mu * mu + eps
        pi = p / x.shape[0]
        new = float(torch.logsumexp(log_prob(mu, var) + torch.log(pi), dim=1).mean())
        i, j, ll = i + 1, new - ll, new
    return pi.flatten(), mu[0], var[0]


@pytest.mark.parametrize("n_iter", [3, 500])
def test_reference_gmm_is_the_reference_em(n_iter):
    feats, _ = toy_features(n_per_class=40, d=4)
    init = feats[torch.tensor([0, 50, 90, 130, 150])]
    mine = fit_reference_gmm(feats, 5, torch.Generator(), n_iter=n_iter, init_means=init)
    ref = reference_em(feats, init, n_iter)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    assert float(mine[0].sum()) == pytest.approx(1.0, abs=1e-4)


def test_kmeans_init_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centres])
    found = kmeans_init(x, 3, torch.Generator().manual_seed(1))
    means = torch.stack([x[i * 30 : (i + 1) * 30].mean(0) for i in range(3)])
    dist = torch.cdist(found, means)
    assert float(dist.min(1).values.max()) < 1e-4 and sorted(dist.argmin(1).tolist()) == [0, 1, 2]


def test_class_statistics_of_the_preset_are_five_component_mixtures():
    feats, labels = toy_features(n_per_class=60, d=4)
    stats = ClassGaussians(5, fit="reference", iterations=500)
    stats.fit(feats, labels, seed=3)
    w, mu, var = stats.params[0]
    assert w.shape == (5,) and mu.shape == (5, 4) and var.shape == (5, 4) and float(var.min()) > 0
    x, y = stats.sample([0, 1], 256, torch.Generator().manual_seed(0))
    assert x.shape == (512, 4) and y.tolist() == [0] * 256 + [1] * 256


def test_augmented_training_data_are_detected_and_the_probe_recomputes_features_each_epoch():
    from torchvision import transforms

    from clcompose.strategies.task_vectors.consolidation import has_train_augmentation

    ds = toy_stream().train_stream[0].dataset.train()
    assert not has_train_augmentation(ds)  # the suite's benchmarks: no training transform
    assert has_train_augmentation(ds.replace_current_transform_group(transforms.Lambda(lambda x: x + 0.1)))
    feats, labels = toy_features()
    feats, labels = feats[labels >= 2], labels[labels >= 2]  # the new head's classes
    calls = []

    def fresh():
        calls.append(1)
        return feats + 0.01 * len(calls), labels

    linear_probe(two_heads(), 1, feats, labels, 3, 0.01, 128, torch.Generator(), features_fn=fresh)
    assert len(calls) == 2  # epochs 2 and 3 (epoch 1 uses the features computed for the statistics)
