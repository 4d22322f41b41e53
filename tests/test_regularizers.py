"""Closed-form ITA/IEL regulariser gradients against autograd of the stated objectives (full, LoRA, IA3)."""

import pytest
import torch
from torch import nn

from clcompose.strategies.task_vectors import regularizers as R
from clcompose.strategies.task_vectors.pool import TaskVectorPool

STYLES = ["full", "lora", "ia3"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 4)
    )


def pool_with_tasks(style: str, n: int) -> TaskVectorPool:
    pool = TaskVectorPool(tiny_model(), style=style, rank=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        t = pool.add_task()
        for p in pool.task_parameters(t):  # move away from the init so that B ≠ 0, l ≠ 1
            p.data.add_(0.3 * torch.randn(p.shape, generator=g))
    return pool


def random_fisher(pool: TaskVectorPool) -> dict:
    g = torch.Generator().manual_seed(2)
    return {n: torch.rand(w.shape, generator=g) + 0.1 for n, w in pool.base_weights().items()}


@pytest.mark.parametrize("style", STYLES)
def test_ita_gradient_equals_autograd_of_the_objective(style):
    pool = pool_with_tasks(style, 3)
    fisher, alpha = random_fisher(pool), 0.7
    params = pool.task_parameters(2)
    current = pool.deltas(2)
    expected = torch.autograd.grad(R.ita_penalty(alpha, fisher, current), params)
    current = pool.deltas(2)
    closed = R.chain_to_params(current, R.ita_grad(alpha, fisher, current), params)
    for e, c in zip(expected, closed):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_ita_objective_matches_the_explicit_sum():
    pool = pool_with_tasks("full", 1)
    fisher = random_fisher(pool)
    tau = {n: d.detach() for n, d in pool.deltas(0).items()}
    explicit = sum(0.5 * 0.3 * float((fisher[n] * tau[n] ** 2).sum()) for n in tau)
    assert float(R.ita_penalty(0.3, fisher, tau)) == pytest.approx(explicit, rel=1e-6)
    g = R.ita_grad(0.3, fisher, tau)
    for n in tau:
        torch.testing.assert_close(g[n], 0.3 * fisher[n] * tau[n])


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("num_tasks", [1, 2, 4])
def test_iel_gradient_equals_autograd_of_the_objective(style, num_tasks):
    pool = pool_with_tasks(style, num_tasks)
    fisher, beta = random_fisher(pool), 1.3
    t = num_tasks - 1
    past = [{n: d.detach() for n, d in pool.deltas(s).items()} for s in range(t)]
    params = pool.task_parameters(t)
    expected = torch.autograd.grad(R.iel_penalty(beta, fisher, pool.deltas(t), past), params)
    past_sum = pool.delta_sum([1.0] * t + [0.0], detach=True) if t else None  # cached Σ_{s<T} τ_s
    current = pool.deltas(t)
    closed = R.chain_to_params(current, R.iel_grad(beta, fisher, current, past_sum, num_tasks), params)
    for e, c in zip(expected, closed):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_iel_objective_is_the_fisher_weighted_scatter():
    torch.manual_seed(3)
    taus = [torch.randn(6) for _ in range(3)]
    f = torch.rand(6)
    mean = sum(taus) / 3
    explicit = 0.5 * 2.0 * sum(float((f * (t - mean) ** 2).sum()) for t in taus)
    got = R.iel_penalty(2.0, {"w": f}, {"w": taus[2]}, [{"w": taus[0]}, {"w": taus[1]}])
    assert float(got) == pytest.approx(explicit, rel=1e-6)
    # first experience convention: (β/4)‖τ‖²_F
    assert float(R.iel_penalty(2.0, {"w": f}, {"w": taus[0]}, [])) == pytest.approx(
        0.5 * float((f * taus[0] ** 2).sum()), rel=1e-6
    )


def test_lora_chain_rule_is_bt_g_and_g_at():
    pool = pool_with_tasks("lora", 1)
    name = pool.names[-1]  # a Linear layer
    mod = pool.vectors[0][-1]
    G = torch.randn(pool.base_weights()[name].shape)
    current = pool.deltas(0)
    grads = {n: (G if n == name else torch.zeros_like(d)) for n, d in current.items()}
    dA, dB = R.chain_to_params({name: current[name]}, {name: G}, [mod.A, mod.B])
    torch.testing.assert_close(dA, mod.B.detach().T @ G)
    torch.testing.assert_close(dB, G @ mod.A.detach().T)
    assert grads[name] is G


def test_ia3_chain_rule_is_row_sum_of_g_times_w0():
    pool = pool_with_tasks("ia3", 1)
    name, mod = pool.names[0], pool.vectors[0][0]  # the conv layer
    w0 = pool.base_weights()[name]
    G = torch.randn(w0.shape)
    (dl,) = R.chain_to_params({name: pool.deltas(0)[name]}, {name: G}, [mod.scale])
    torch.testing.assert_close(dl, (G * w0).sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("style", STYLES)
def test_coupled_surrogate_has_the_closed_form_gradient(style):
    pool = pool_with_tasks(style, 2)
    fisher = random_fisher(pool)
    params = pool.task_parameters(1)
    current = pool.deltas(1)
    g = R.iel_grad(0.9, fisher, current, pool.delta_sum([1.0, 0.0], detach=True), 2)
    via_surrogate = torch.autograd.grad(R.surrogate(current, g), params)
    closed = R.chain_to_params(pool.deltas(1), g, params)
    for a, b in zip(via_surrogate, closed):
        torch.testing.assert_close(a, b)
