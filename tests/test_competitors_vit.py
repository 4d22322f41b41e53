"""L2P, CODA-Prompt and InfLoRA on a tiny random ViT: prompt selection, weights, prefix attention and the
InfLoRA subspace against hand-written
formulas; end to end through the run loop, resume, aggregate; one clear error on a CNN."""

import math

import pandas as pd
import pytest
import torch

from clcompose.bench.models.backbones import build_backbone
from clcompose.bench.runs.run import run
from clcompose.strategies.core.heads import ClassIncrementalNet
from clcompose.strategies.core.registry import STRATEGIES, ConfigError
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.prompts.coda_prompt import CODANet, CODAPool
from clcompose.strategies.prompts.inflora import grow_subspace, orthogonal_design
from clcompose.strategies.prompts.l2p import L2PNet
from clcompose.strategies.prompts.vit import PrefixAttention

TINY_VIT = {"pretrained": False, "img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 2}
CONFIG = {
    "benchmark": "split-digits",
    "backbone": "vit-b16",
    "benchmark_options": {"n_experiences": 5, "per_class": 20},
    "backbone_options": TINY_VIT,
    "train": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
    "seed": 2,
    "stream_seed": 1,
}


def tiny_vit():
    torch.manual_seed(0)
    return build_backbone("vit-b16", TINY_VIT).eval()


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_prefix_attention_equals_the_written_out_softmax():
    torch.manual_seed(0)
    attn = tiny_vit().net.blocks[0].attn
    wrapped = PrefixAttention(attn)
    x = torch.randn(2, 5, 24)
    assert torch.equal(wrapped(x), attn(x))  # nothing pending: the original module
    pk, pv = torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    wrapped.pending = (pk, pv)
    got = wrapped(x)
    q, k, v = attn.qkv(x).split(24, dim=-1)
    heads, d = 2, 12
    out = torch.zeros(2, 5, 24)
    for b in range(2):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            keys = torch.cat([pk[b, :, cols], k[b, :, cols]])
            values = torch.cat([pv[b, :, cols], v[b, :, cols]])
            for i in range(5):
                scores = [float(q[b, i, cols] @ keys[j]) / math.sqrt(d) for j in range(len(keys))]
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                out[b, i, cols] = sum(wj / sum(w) * values[j] for j, wj in enumerate(w))
    assert torch.allclose(got, attn.proj(out), atol=1e-5)


def test_coda_prompt_weights_follow_the_attention_formula():
    torch.manual_seed(0)
    pool = CODAPool(dim=6, length=4, per_task=2)
    pool.add_chunk()
    pool.add_chunk()  # two experiences: 4 components, the first 2 frozen
    assert [p.requires_grad for p in pool.prompts] == [False, True]
    keys, attention = torch.cat(list(pool.keys)), torch.cat(list(pool.attention))
    prompts = torch.cat(list(pool.prompts))
    assert torch.allclose(keys @ keys.T, torch.eye(4), atol=1e-5)  # Gram–Schmidt across experiences
    assert torch.allclose(attention @ attention.T, torch.eye(4), atol=1e-5)
    q = torch.randn(3, 6)
    alpha, pk, pv = pool(q)
    for b in range(3):
        for m in range(4):
            qa = [q[b, d].item() * attention[m, d].item() for d in range(6)]
            assert alpha[b, m].item() == pytest.approx(cos(qa, keys[m].tolist()), abs=1e-5)
        p = sum(alpha[b, m] * prompts[m] for m in range(4))
        assert torch.allclose(pk[b], p[:2], atol=1e-5) and torch.allclose(pv[b], p[2:], atol=1e-5)


def test_coda_net_prefixes_the_chosen_blocks_and_trains_only_the_new_components():
    from clcompose.bench.data.benchmarks import build_benchmark

    bm = build_benchmark("split-digits", {"n_experiences": 5, "per_class": 10}, stream_seed=0)
    options = STRATEGIES["coda-prompt"].options.from_dict({"components_per_task": 3, "layers": [1]})
    strategy = STRATEGIES["coda-prompt"].factory(ClassIncrementalNet(tiny_vit()), options, TrainConfig(epochs=1))
    net = strategy.model
    assert isinstance(net, CODANet) and isinstance(net.blocks[1].attn, PrefixAttention)
    assert not isinstance(net.blocks[0].attn, PrefixAttention)
    frozen_vit = [p.detach().clone() for p in net.backbone.parameters()]
    strategy.train(bm.train_stream[0])
    first = [p.detach().clone() for p in net.pools["1"].parameters()]
    strategy.train(bm.train_stream[1])
    pool = net.pools["1"]
    assert len(pool.prompts) == 2
    old = (pool.prompts[0], pool.keys[0], pool.attention[0])
    assert all(torch.equal(a, b) for a, b in zip(old, first))  # the first experience's components are frozen
    assert all(torch.equal(a, b) for a, b in zip(frozen_vit, net.backbone.parameters()))  # the ViT stays frozen
    assert not torch.equal(pool.prompts[1], first[0])


def test_l2p_selects_the_top_n_keys_and_pulls_them_to_the_query():
    torch.manual_seed(0)
    options = STRATEGIES["l2p"].options.from_dict({"pool_size": 6, "prompt_length": 2, "top_k": 3})
    net = L2PNet(tiny_vit(), ClassIncrementalNet(torch.nn.Identity(), out_features=24).heads, options)
    x = torch.rand(4, 1, 8, 8)
    q = net.query(x)
    chosen = net.select(q)
    keys = net.prompt.prompt_key.detach()
    total = 0.0
    for b in range(4):
        sims = [cos(q[b].tolist(), keys[m].tolist()) for m in range(6)]
        top = sorted(range(6), key=lambda m: -sims[m])[:3]
        assert sorted(chosen["prompt_idx"][b].tolist()) == sorted(top)
        expected_tokens = torch.cat([net.prompt.prompt[m] for m in chosen["prompt_idx"][b].tolist()])
        assert torch.equal(chosen["tokens"][b], expected_tokens)
        total += sum(sims[m] for m in top)
    assert chosen["reduce_sim"].item() == pytest.approx(total / 4, abs=1e-5)
    feats = net.prompted_features(x)  # the mean of the 6 prompt tokens' final outputs
    assert net.vit.norm.tokens.shape == (4, 1 + 6 + 4, 24)
    assert torch.allclose(feats, net.vit.norm.tokens[:, 1:7].mean(1))
    assert net.extra_loss.item() == pytest.approx(-0.1 * total / 4, abs=1e-5)


@pytest.mark.parametrize(
    "strategy, options", [("l2p", {"pool_size": 5, "top_k": 2}), ("coda-prompt", {}), ("inflora", {"rank": 4})]
)
def test_vit_methods_end_to_end_resume_identical_and_aggregated(strategy, options, tmp_path, monkeypatch):
    from clcompose.bench.cli.main import main
    from clcompose.bench.runs import checkpoint

    cfg = CONFIG | {"strategy": strategy, "strategy_options": options}
    _, reference = run(cfg, runs_dir=tmp_path / "reference", progress=False)
    m = reference["accuracy_matrix"]
    assert len(m) == 5 and all(0 <= v <= 1 for row in m for v in row)

    class Killed(Exception):
        pass

    real_save, calls = checkpoint.save, []

    def save_then_die(*args, **kwargs):
        out = real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return out

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    torch.manual_seed(7)
    _, resumed = run(cfg, runs_dir=tmp_path / "interrupted", progress=False)
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"] and resumed["metrics"] == reference["metrics"]
    assert [r["from_step"] for r in resumed["resumes"]] == [2]
    assert main(["aggregate", str(tmp_path / "reference"), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "tables" / "split-digits.csv")
    assert table["variant"].str.startswith(strategy).any(), table["variant"].tolist()


@pytest.mark.parametrize("strategy", ["l2p", "coda-prompt", "inflora"])
def test_vit_methods_refuse_a_cnn_backbone_in_one_line(strategy, tmp_path):
    cfg = CONFIG | {
        "strategy": strategy,
        "backbone": "small-cnn",
        "backbone_options": {"source": "digits", "pretrain_epochs": 1, "width": 8, "input_size": 16},
    }
    with pytest.raises(ConfigError, match="needs a Vision Transformer backbone") as err:
        run(cfg, runs_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="top_k"):
        STRATEGIES["l2p"].options.from_dict({"pool_size": 2, "top_k": 3})


def test_inflora_subspace_follows_the_energy_criterion_and_the_design_is_orthogonal_to_it():
    torch.manual_seed(0)
    h1 = torch.randn(40, 3) @ torch.randn(3, 8) + 0.01 * torch.randn(40, 8)  # about 3 directions
    basis = grow_subspace(h1, torch.zeros(8, 0), threshold=0.9)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
    s = torch.linalg.svdvals(h1.double())  # with M empty: the fewest k with Σ_{i≤k} σ_i² ≥ 0.9 ‖H‖²
    k = next(i + 1 for i in range(len(s)) if s[: i + 1].pow(2).sum() >= 0.9 * s.pow(2).sum())
    assert basis.shape[1] == k
    h2 = torch.randn(30, 8)
    a = orthogonal_design(h2, basis, rank=2)
    assert a.shape == (2, 8) and (a @ basis).abs().max() < 1e-5  # A M = 0
    x_old = torch.randn(5, basis.shape[1]) @ basis.T  # inputs inside span(M)
    b = torch.randn(6, 2)
    assert (x_old @ a.T @ b.T).abs().max() < 1e-4  # B A x = 0 for any B
    grown = grow_subspace(h2, basis, threshold=0.95)
    assert torch.allclose(grown[:, : basis.shape[1]].abs(), basis.abs(), atol=1e-4)  # old directions kept


def test_inflora_merged_update_of_a_later_experience_leaves_the_stored_subspace_alone():
    from clcompose.bench.data.benchmarks import build_benchmark

    bm = build_benchmark("split-digits", {"n_experiences": 5, "per_class": 10}, stream_seed=0)
    options = STRATEGIES["inflora"].options.from_dict({"rank": 3, "threshold": 0.9})
    strategy = STRATEGIES["inflora"].factory(ClassIncrementalNet(tiny_vit()), options, TrainConfig(epochs=2, lr=0.1))
    strategy.train(bm.train_stream[0])
    adapters = strategy.model.adapters
    subspaces = [a.subspace.clone() for a in adapters]
    weights = [a.base.weight.detach().clone() for a in adapters]
    assert all(0 < m.shape[1] < 24 for m in subspaces)
    strategy.train(bm.train_stream[1])
    for adapter, m, w in zip(adapters, subspaces, weights):
        assert (adapter.lora_a @ m).abs().max() < 1e-5  # A_2 ⟂ M_1
        delta = adapter.base.weight.detach() - w  # the merged B_2 A_2
        assert delta.abs().max() > 1e-4 and (delta @ m).abs().max() < 1e-4 * max(1.0, delta.abs().max().item())
        assert torch.equal(adapter.lora_b, torch.zeros_like(adapter.lora_b))


@pytest.mark.parametrize(
    "strategy, options", [("l2p", {"pool_size": 4, "top_k": 2}), ("coda-prompt", {}), ("inflora", {"rank": 3})]
)
def test_a_later_experience_leaves_the_past_heads_exactly_where_they_were(strategy, options):
    """Past logits are masked while training and each experience gets a fresh optimiser, as in the methods'
    codes; with Avalanche's default (the optimiser state kept) Adam's momentum kept moving the past heads."""
    from clcompose.bench.data.benchmarks import build_benchmark

    bm = build_benchmark("split-digits", {"n_experiences": 5, "per_class": 10}, stream_seed=0)
    opts = STRATEGIES[strategy].options.from_dict(options)
    torch.manual_seed(0)
    strat = STRATEGIES[strategy].factory(
        ClassIncrementalNet(tiny_vit()), opts, TrainConfig(epochs=2, batch_size=8, optimizer="adam", lr=0.01)
    )
    strat.train(bm.train_stream[0])
    past = {n: p.detach().clone() for n, p in strat.model.heads.named_parameters()}
    strat.train(bm.train_stream[1])
    now = dict(strat.model.heads.named_parameters())
    assert set(now) > set(past)  # the second experience's head was added and trained ...
    assert all(torch.equal(now[n], p) for n, p in past.items())  # ... the first one's did not move
