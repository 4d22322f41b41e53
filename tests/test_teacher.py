"""The hypernetwork teacher (bench.teacher), its streams (bench.teacher_streams) and the pure metrics
(bench.compmetrics): exact maths, pool combinatorics, support predicates, R² sanity."""

import math

import numpy as np
import pytest
import torch

from clcompose.bench.data.teacher import (
    HyperTeacher,
    TeacherSpec,
    code_matrix,
    is_compositional,
    is_connected,
    layer_codes,
    make_tasks,
    split_pool,
    task_pool,
)
from clcompose.bench.data.teacher_streams import TeacherOptions, generate, stream_layout
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.metrics import compositional as C


@pytest.fixture(scope="module")
def teacher():
    return HyperTeacher(TeacherSpec(n_modules=6, generated_layers=2, hidden_dim=16, n_reference=200, seed=3))


def test_generated_weights_are_exactly_linear_in_z(teacher):
    g = torch.Generator().manual_seed(0)
    za, zb = torch.rand(2, 6, generator=g), torch.rand(2, 6, generator=g)
    a, b = 0.7, -1.3
    lhs = teacher.generated_weights(a * za + b * zb)
    rhs = a * teacher.generated_weights(za) + b * teacher.generated_weights(zb)
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    # against the explicit sum Σ_m z_{ℓ,m} Θ_{ℓ,m}
    explicit = sum(za[1, m] * teacher.modules[1, m] for m in range(6))
    torch.testing.assert_close(teacher.generated_weights(za)[1], explicit, rtol=1e-5, atol=1e-6)
    # one-hot codes give the module weights themselves
    z = torch.zeros(2, 6)
    z[0, 4] = z[1, 2] = 1
    torch.testing.assert_close(teacher.generated_weights(z)[0], teacher.modules[0, 4])


def test_targets_are_invariant_to_positive_scaling_of_z(teacher):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 50, 16, generator=g) * 2 - 1
    z = torch.rand(3, 2, 6, generator=g)
    soft, hard = teacher.targets(x, z)
    for c in (0.01, 0.5, 7.0):
        soft_c, hard_c = teacher.targets(x, c * z)
        torch.testing.assert_close(soft_c, soft, rtol=1e-4, atol=1e-5)
        assert torch.equal(hard_c, hard)
    # but not to a sign flip (ReLU is only positively homogeneous)
    assert not torch.allclose(teacher.targets(x, -z)[0], soft, atol=1e-3)
    # standardisation: zero mean and unit std per output unit over the reference inputs
    ref = teacher.logits(teacher.reference.expand(3, -1, -1), z)
    torch.testing.assert_close(ref.mean(1), torch.zeros(3, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(ref.std(1), torch.ones(3, 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize("m,total,random_ood", [(4, 100, 25), (6, 441, 110), (8, 1296, 324)])
def test_pool_sizes_match_the_combinatorics(m, total, random_ood):
    assert len(layer_codes(m, 2)) == math.comb(m, 1) + math.comb(m, 2)
    assert len(task_pool(m, 2, 2)) == total == (m + math.comb(m, 2)) ** 2
    in_dist, ood = split_pool(m, 2, 2, "random")
    assert len(ood) == random_ood and len(in_dist) + len(ood) == total and not set(in_dist) & set(ood)
    assert len(task_pool(m, 3, 1)) == m + math.comb(m, 2) + math.comb(m, 3)


@pytest.mark.parametrize(
    "m,noncomp,connected,disconnected,shared_ood", [(6, 126, 324, 36, 117), (8, 288, 576, 104, 698)]
)
def test_reference_splits(m, noncomp, connected, disconnected, shared_ood):
    assert len(split_pool(m, 2, 2, "non_compositional")[1]) == noncomp
    conn, ood_c = split_pool(m, 2, 2, "connected")
    disc, ood_d = split_pool(m, 2, 2, "disconnected")
    assert (len(conn), len(disc), len(ood_c)) == (connected, disconnected, shared_ood)
    assert ood_c == ood_d and not set(ood_c) & (set(conn) | set(disc))
    # support predicates: connected holds for the connected and random supports, fails for the disconnected one;
    # compositional fails only for the non-compositional support
    assert is_connected(conn, m, 2) and is_compositional(conn, m, 2)
    assert not is_connected(disc, m, 2) and is_compositional(disc, m, 2)
    assert is_connected(split_pool(m, 2, 2, "random")[0], m, 2)
    nc = split_pool(m, 2, 2, "non_compositional")[0]
    assert not is_compositional(nc, m, 2) and not is_connected(nc, m, 2)
    with pytest.raises(ConfigError):
        split_pool(m, 2, 2, "dense")


def test_continuous_codes_keep_the_support():
    rng = np.random.default_rng(0)
    for _ in range(50):
        z = code_matrix(((1, 4), (0,)), 6, True, rng)
        assert np.all((z[0, [1, 4]] >= 0.5) & (z[0, [1, 4]] < 1)) and z[1, 0] >= 0.5 and z[1, 0] < 1
        assert np.count_nonzero(z) == 3
    assert np.array_equal(code_matrix(((1, 4),), 6, False, rng)[0], [0, 1, 0, 0, 1, 0])


def test_tasks_are_deterministic_and_split(teacher):
    a = make_tasks(teacher, [((0,), (1, 2))], 3, 5, 6, 7, True, seed=11)
    b = make_tasks(teacher, [((0,), (1, 2))], 3, 5, 6, 7, True, seed=11)
    assert torch.equal(a.x, b.x) and torch.equal(a.soft, b.soft) and torch.equal(a.z, b.z)
    assert [t[0].shape[1] for t in (a.support(), a.query(), a.test())] == [5, 6, 7]
    assert torch.equal(a.hard, a.soft.argmax(-1))
    soft, _ = teacher.targets(a.x, a.z)
    torch.testing.assert_close(a.soft, soft)


def _predicates(stream, **kw):
    o = TeacherOptions(**kw)
    layout, probes = stream_layout(stream, o, stream_seed=0)
    m = o.n_modules
    after = []
    seen = []
    for exp in layout:
        seen += [(s,) for s in exp]
        modules = sorted({i for (s,) in seen for i in s})
        after.append((modules, is_connected([(tuple(modules.index(i) for i in s),) for (s,) in seen], len(modules), 1)))
    final = [(s,) for exp in layout for s in exp]
    return layout, probes, after, is_compositional(final, m, 1), is_connected(final, m, 1)


def test_stream_support_predicates():
    layout, probes, after, comp, conn = _predicates("connected")
    assert all(ok for _, ok in after) and comp and conn  # compositional and connected after every experience
    assert [modules for modules, _ in after] == [list(range(e + 1)) for e in range(6)]
    layout_d, probes_d, after_d, comp_d, conn_d = _predicates("disconnected")
    assert comp_d and not conn_d
    assert probes_d["ood"] == probes["ood"]  # both scored on the same held-out pool
    trained = {s for exp in layout + layout_d for s in exp}
    assert all(len(p) == 2 and p not in trained for p in probes["ood"])
    assert len(probes["ood"]) == 8 and all(min(p) < 3 <= max(p) for p in probes["ood"])  # cross pairs
    *_, comp_n, conn_n = _predicates("noncomp")
    layout_n, probes_n = stream_layout("noncomp", TeacherOptions(), 0)
    assert not comp_n and all(5 in c for c in probes_n["noncomp"]) and not any(5 in c for c in probes_n["ood"])
    *_, comp_r, conn_r = _predicates("random")
    assert comp_r and conn_r
    layout_1, probes_1, after_1, comp_1, conn_1 = _predicates("one-module")
    assert comp_1 and not conn_1 and len(probes_1["ood"]) == 15


def test_streams_share_task_data_across_streams():
    o = TeacherOptions(tasks_per_combination=2, n_support=4, n_query=4, n_test=4)
    conn, disc = generate("connected", o, 0), generate("disconnected", o, 0)
    torch.testing.assert_close(conn.probes["ood"].x, disc.probes["ood"].x)
    assert torch.equal(conn.experiences[0].x, disc.experiences[0].x[:2])  # {0} is the first combination of both


def test_reference_layout_streams_use_the_reference_supports_untied():
    """layout=reference: the connected/disconnected streams train the reference's supports (M = 6, L = 2: 324 and
    36 combinations, per-layer codes untied) over n_experiences and share the pool of 117 combinations in neither."""
    from clcompose.bench.data.benchmarks import build_benchmark

    small = {
        "n_modules": 6,
        "generated_layers": 2,
        "layout": "reference",
        "n_experiences": 3,
        "tasks_per_combination": 1,
        "n_support": 2,
        "n_query": 2,
        "n_test": 2,
    }
    bms = {s: build_benchmark(f"teacher-{s}", small, 0) for s in ("connected", "disconnected")}
    for stream, n_trained in (("connected", 324), ("disconnected", 36)):
        data = bms[stream].teacher
        trained = [c for t in data.experiences for c in t.combinations]
        assert len(data.experiences) == 3 and len(trained) == len(set(trained)) == n_trained
        assert any(c[0] != c[1] for c in trained) or stream == "disconnected"  # untied layers
        assert set(trained) == set(split_pool(6, 2, 2, stream)[0])
        assert not set(trained) & set(data.probes["ood"].combinations)
        assert bms[stream].info["connected"] == (stream == "connected") and bms[stream].info["compositional"]
    conn_ood, disc_ood = (bms[s].teacher.probes["ood"] for s in ("connected", "disconnected"))
    assert len(conn_ood.combinations) == 117 and conn_ood.combinations == disc_ood.combinations
    torch.testing.assert_close(conn_ood.x, disc_ood.x)  # the same probe tasks for both


def test_r2_is_one_for_z_and_about_zero_for_random_features():
    rng = np.random.default_rng(0)
    z_tr, z_te = rng.uniform(size=(400, 6)), rng.uniform(size=(200, 6))
    assert C.decoding_r2(z_tr, z_tr, z_te, z_te, l2=0.0) == pytest.approx(1.0, abs=1e-12)
    assert C.decoding_r2(z_tr, z_tr, z_te, z_te, l2=1.0) > 0.999
    assert C.decoding_r2(3 * z_tr @ rng.normal(size=(6, 6)) + 1, z_tr, 3 * z_te @ rng.normal(size=(6, 6)) + 1, z_te) < 1
    noise_tr, noise_te = rng.normal(size=(400, 10)), rng.normal(size=(200, 10))
    r2 = C.decoding_r2(noise_tr, z_tr, noise_te, z_te)
    assert -0.1 < r2 < 0.05
    # against scikit-learn's reference pipeline, constant columns left out
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    feats_tr, feats_te = (
        z_tr @ rng.normal(size=(6, 9)) + 0.3 * rng.normal(size=(400, 9)),
        z_te @ rng.normal(size=(6, 9)),
    )
    z_te_const = z_te.copy()
    z_te_const[:, 2] = 0.5
    sc = StandardScaler().fit(feats_tr)
    pred = Ridge(alpha=1.0).fit(sc.transform(feats_tr), z_tr).predict(sc.transform(feats_te))
    want = np.mean([r2_score(z_te_const[:, j], pred[:, j]) for j in range(6) if j != 2])
    assert C.decoding_r2(feats_tr, z_tr, feats_te, z_te_const) == pytest.approx(want, rel=1e-9)
    assert np.isnan(C.decoding_r2_per_target(feats_tr, z_tr, feats_te, z_te_const)[2])
    # and against the closed form, without scikit-learn: standardise with the training statistics, centre,
    # β = (XᵀX + λI)⁻¹ Xᵀ(Z − z̄), ẑ = z̄ + X_te β, R² = 1 − SSE / SST per column
    mu, sd = feats_tr.mean(0), feats_tr.std(0)
    x_tr, x_te = (feats_tr - mu) / sd, (feats_te - mu) / sd
    x_mean, z_mean = x_tr.mean(0), z_tr.mean(0)
    beta = np.linalg.solve((x_tr - x_mean).T @ (x_tr - x_mean) + np.eye(9), (x_tr - x_mean).T @ (z_tr - z_mean))
    z_hat = z_mean + (x_te - x_mean) @ beta
    r2 = 1 - ((z_te - z_hat) ** 2).sum(0) / ((z_te - z_te.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(C.decoding_r2_per_target(feats_tr, z_tr, feats_te, z_te), r2, rtol=1e-9)


def test_small_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    soft = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    assert C.agreement_accuracy(logits, soft) == pytest.approx(2 / 3)
    p = soft
    q = torch.softmax(logits, -1)
    assert float(C.soft_kl(logits, soft)) == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-6)
    assert float(C.soft_kl(soft.log(), soft)) == pytest.approx(0.0, abs=1e-6)
    assert C.compositional_gap(0.7, 0.5) == pytest.approx(0.2)
    assert C.composition_gain([0.6, 0.4], [[0.5, 0.55], [0.45, 0.3]]) == pytest.approx(
        ((0.6 - 0.55) + (0.4 - 0.45)) / 2
    )
    with pytest.raises(ValueError):
        C.composition_gain([], [])
