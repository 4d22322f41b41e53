"""TMC: the linearised forward against finite differences and the full network, training and runs end to end."""

import pytest
import torch
from torch import nn

from clcompose.bench.runs.run import run
from clcompose.strategies.task_vectors.composable import ComposableNet
from clcompose.strategies.task_vectors.composition import linearised_forward
from tests.test_ita_iel import config
from tests.test_regularizers import pool_with_tasks


def test_the_linearised_forward_is_f0_plus_j_tau_by_central_finite_differences():
    pool = pool_with_tasks("full", 1).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    base = {n: w.detach() for n, w in pool.base_weights().items()}
    tau = {n: d.detach() for n, d in pool.deltas(0).items()}
    h = 1e-6
    jt = (
        pool.forward_with({n: base[n] + h * tau[n] for n in base}, x)
        - pool.forward_with({n: base[n] - h * tau[n] for n in base}, x)
    ) / (2 * h)
    torch.testing.assert_close(linearised_forward(pool, base, tau, x), pool.forward_with(base, x) + jt)


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_the_linearised_forward_equals_the_network_to_first_order(style):
    pool = pool_with_tasks(style, 1).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    base = {n: w.detach() for n, w in pool.base_weights().items()}
    tau = {n: d.detach() for n, d in pool.deltas(0).items()}
    errors = []
    for eps in (1e-2, 1e-3):
        small = {n: eps * t for n, t in tau.items()}
        full = pool.forward_with({n: base[n] + small[n] for n in base}, x)
        errors.append(float((linearised_forward(pool, base, small, x) - full).abs().max()))
    assert errors[1] < errors[0] / 50  # the remainder is O(ε²): ε / 10 shrinks it ~100×


def test_tmc_trains_through_the_linearised_network_with_gradients_on_the_current_vector_only():
    backbone = nn.Sequential(*list(pool_with_tasks("lora", 0).model.children())[:-1])
    net = ComposableNet(backbone, 5, style="lora", rank=2, layers="all", train_composition="tangent")
    for t in range(2):
        net.pool.add_task()
        net.heads.add_head([2 * t, 2 * t + 1])
        for p in net.pool.task_parameters(t):
            p.data.add_(0.2)
    net.pool.freeze(0)
    net.train()
    x = torch.randn(3, 2, 6, 6)
    base = {n: w.detach() for n, w in net.pool.base_weights().items()}
    expected = linearised_forward(net.pool, base, {n: d.detach() for n, d in net.pool.deltas(1).items()}, x)
    out = net.features(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is None for p in net.pool.task_parameters(0))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.pool.task_parameters(1))


def test_tmc_runs_end_to_end_through_bench_run(tmp_path):
    path, rec = run(config("tmc"), runs_dir=tmp_path, progress=False)
    assert rec["config"]["strategy_options"]["composition"] == "tangent"
    extras = rec["strategy_extras"]
    assert extras["method"] == "tmc" and extras["lambda"] is None
    assert rec["metrics"]["final_average_accuracy"] > 1 / 6
    diag = extras["diagnostics"]
    assert [d["tasks"] for d in diag] == [1, 2, 3] and diag[-1]["jensen_gap"] >= -1e-6  # CE convex in logits
    assert (path.parent / "task_vectors.safetensors").is_file()
