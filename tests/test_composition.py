"""Composition of task vectors, the Jensen bound on a quadratic, and the diagnostics' formulas."""

import copy

import pytest
import torch

from clcompose.strategies.task_vectors.diagnostics import cosine_matrix, fisher_weighted_spread, jensen_gap
from clcompose.strategies.task_vectors.pool import TaskVectorPool, select_layers
from tests.test_regularizers import pool_with_tasks, tiny_model


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_composition_is_the_weighted_average_of_the_individual_models(style):
    pool = pool_with_tasks(style, 3)
    w = [0.5, 0.2, 0.3]
    base = pool.base_weights()
    individual = [{n: base[n] + d for n, d in pool.deltas(t).items()} for t in range(3)]
    composed = pool.weights(w)
    for n in pool.names:
        torch.testing.assert_close(composed[n], sum(wi * ind[n] for wi, ind in zip(w, individual)))
    uniform = pool.weights()
    for n in pool.names:
        torch.testing.assert_close(uniform[n], sum(ind[n] for ind in individual) / 3)


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_the_functional_forward_equals_a_copied_network_with_those_weights(style):
    pool = pool_with_tasks(style, 2)
    x = torch.randn(3, 2, 6, 6)
    w = pool.weights([0.7, 0.4])
    clone = copy.deepcopy(pool.model)
    state = clone.state_dict()
    state.update({n: v.detach() for n, v in w.items()})
    clone.load_state_dict(state)
    torch.testing.assert_close(pool(x, [0.7, 0.4]), clone(x))


@pytest.mark.parametrize("style", ["full", "lora", "ia3"])
def test_sums_without_a_graph_equal_the_written_out_sum_bit_for_bit_and_leave_the_parameters(style):
    pool = pool_with_tasks(style, 3)
    coeffs = [0.7, 0.0, -0.3]
    params = [p.detach().clone() for p in pool.parameters()]
    base = {n: w.detach() for n, w in pool.base_weights().items()}
    deltas = [{n: d.detach() for n, d in pool.deltas(t).items()} for t in range(3)]
    expected = {}  # the rule written out: 0, then + c_t · τ_t task by task (the product rounded, then the sum)
    for n in pool.names:
        acc = torch.zeros_like(base[n])
        for c, d in zip(coeffs, deltas):
            if c != 0:
                acc = acc + c * d[n]
        expected[n] = acc
    with torch.no_grad():
        in_place = pool.delta_sum(coeffs)
        weights = pool.weights(coeffs)
        extra = pool.weights(coeffs, extra=deltas[0])
    detached = pool.delta_sum(coeffs, detach=True)  # gradient mode on, but nothing to differentiate
    for n in pool.names:
        assert torch.equal(in_place[n], expected[n]) and torch.equal(detached[n], expected[n])
        assert not detached[n].requires_grad
        assert torch.equal(weights[n], base[n] + expected[n] + 0)
        assert torch.equal(extra[n], base[n] + expected[n] + deltas[0][n])
    with_graph = pool.weights(coeffs)  # gradient mode: the graph-keeping sum, the same values
    assert all(with_graph[n].requires_grad and torch.equal(with_graph[n], weights[n]) for n in pool.names)
    assert all(torch.equal(p, q) for p, q in zip(pool.parameters(), params))  # no parameter was written to


def test_coefficient_zero_removes_a_module_exactly():
    pool = pool_with_tasks("lora", 3)
    without = pool.weights([0.25, 0.0, 0.5])
    reference = TaskVectorPool(tiny_model(), style="lora", rank=2)  # same θ0, only tasks 0 and 2
    for src in (0, 2):
        t = reference.add_task()
        for p, q in zip(reference.task_parameters(t), pool.task_parameters(src)):
            p.data.copy_(q.data)
    expected = reference.weights([0.25, 0.5])
    for n in pool.names:
        assert torch.equal(without[n], expected[n])
    assert all(torch.equal(a, b) for a, b in zip(pool.weights([0.0, 0.0, 0.0]).values(), pool.base_weights().values()))


def test_new_task_vectors_start_at_zero_and_base_is_frozen():
    for style in ("full", "lora", "ia3"):
        pool = TaskVectorPool(tiny_model(), style=style, rank=2)
        pool.add_task()
        assert all(float(d.detach().abs().max()) == 0.0 for d in pool.deltas(0).values())
        assert not any(p.requires_grad for p in pool.model.parameters())


def test_layer_selection():
    model = tiny_model()
    assert select_layers(model, "linear") == ["3.weight", "5.weight"]
    assert select_layers(model, "conv") == ["0.weight"]
    assert select_layers(model, ["5"]) == ["5.weight"]
    with pytest.raises(ValueError, match="no Linear/Conv2d"):
        select_layers(model, ["blocks.*"])


def test_jensen_gap_on_a_quadratic_equals_the_curvature_weighted_spread():
    """L(θ) = ½ (θ − a)ᵀ H (θ − a) + c: Σ w L(θ0 + τ_t) − L(θ0 + Σ w τ) = ½ Σ w ‖τ_t − τ_P‖²_H ≥ 0."""
    torch.manual_seed(0)
    dim, t = 12, 4
    h = torch.rand(dim, dtype=torch.float64) * 3  # diagonal Hessian
    a, theta0 = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)

    def loss(theta):
        return float(0.5 * (h * (theta - a) ** 2).sum() + 1.7)

    taus = torch.randn(t, dim, dtype=torch.float64)
    for w in ([0.25] * 4, [0.1, 0.2, 0.3, 0.4]):
        tau_p = (torch.tensor(w, dtype=torch.float64)[:, None] * taus).sum(0)
        gap = jensen_gap([loss(theta0 + taus[i]) for i in range(t)], loss(theta0 + tau_p), w)
        assert gap >= 0
        assert gap == pytest.approx(fisher_weighted_spread(taus, w, h), rel=1e-10)


def test_spread_and_cosine_by_hand():
    deltas = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # τ_P = (0.5, 1); ‖τ_0 − τ_P‖² = 0.25 + 1, ‖τ_1 − τ_P‖² = 0.25 + 1 → ½ · (½·1.25 + ½·1.25)
    assert fisher_weighted_spread(deltas, [0.5, 0.5]) == pytest.approx(0.625)
    assert fisher_weighted_spread(deltas, [0.5, 0.5], torch.tensor([2.0, 0.0])) == pytest.approx(
        0.5 * (0.5 * 0.5 + 0.5 * 0.5)
    )
    assert cosine_matrix(deltas) == [[1.0, 0.0], [0.0, 1.0]]
    assert jensen_gap([1.0, 3.0], 1.5) == pytest.approx(0.5)
