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


# ---------------------------------------------------------------------- the proximal step vs the explicit one
def quadratic(style: str, method: str, scale: float = 1.0):
    """A pool at its current task, and the (a, b) of ITA or IEL written out by hand (not via the code)."""
    pool = pool_with_tasks(style, 3).double()  # float64, so that the O(s²) comparison sees no rounding
    fisher = {n: scale * f.double() for n, f in random_fisher(pool).items()}
    coeff = 0.7
    if method == "ita":
        return pool, {n: coeff * f for n, f in fisher.items()}, None, coeff, fisher
    past = pool.delta_sum([1.0, 1.0, 0.0], detach=True)
    r = 1 / 3
    a = {n: coeff * (1 - r) * f for n, f in fisher.items()}
    b = {n: coeff * r * f * past[n] for n, f in fisher.items()}
    return pool, a, b, coeff, fisher


def explicit_and_proximal(pool, a, b, s: float, sweeps: int = 1):
    """One explicit step θ − s∇R (∇R by autograd of ½Σaτ² − Σbτ) and one proximal step, per parameter."""
    from clcompose.strategies.task_vectors import proximal as P

    params = pool.task_parameters(2)
    deltas = pool.deltas(2)
    obj = sum(0.5 * (a[n] * deltas[n].pow(2)).sum() - ((b[n] * deltas[n]).sum() if b else 0) for n in deltas)
    grads = torch.autograd.grad(obj, params)
    explicit = [p.detach() - s * g for p, g in zip(params, grads)]
    base = pool.base_weights()
    prox = []
    for name, mod in zip(pool.names, pool.vectors[2]):
        bn = b[name] if b else None
        if pool.style == "full":
            prox.append(P.prox_full(mod.delta.detach(), a[name], bn, s))
        elif pool.style == "ia3":
            prox.append(P.prox_ia3(mod.scale.detach(), base[name], a[name], bn, s))
        else:
            prox += list(P.prox_lora(mod.A.detach(), mod.B.detach(), a[name], bn, s, sweeps))
    return explicit, prox, [p.detach() for p in params]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("method", ["ita", "iel"])
def test_proximal_step_equals_the_explicit_step_to_first_order(style, method):
    pool, a, b, _, _ = quadratic(style, method)
    errors = []
    for s in (1e-3, 1e-4):
        explicit, prox, start = explicit_and_proximal(pool, a, b, s)
        moved = max(float((e - p0).abs().max()) for e, p0 in zip(explicit, start))
        err = max(float((e - p).abs().max()) for e, p in zip(explicit, prox))
        assert err < 0.05 * moved  # agree to leading order …
        errors.append(err)
    assert errors[1] < errors[0] / 50  # … and the difference is O(s²): ×100 smaller for s ÷ 10


@pytest.mark.parametrize("style", ["full", "ia3"])
def test_full_and_ia3_proximal_steps_are_the_exact_minimisers(style):
    """τ' = argmin ½Σaτ² − Σbτ + ‖θ' − θ‖²/(2s): the gradient of that objective vanishes at the proximal point."""
    pool, a, b, _, _ = quadratic(style, "iel")
    s = 3.0
    _, prox, start = explicit_and_proximal(pool, a, b, s)
    for name, p_new, p_old in zip(pool.names, prox, start):
        u = p_new.clone().requires_grad_(True)
        base = pool.base_weights()[name]
        tau = u if style == "full" else base * (u.view(-1, *([1] * (base.dim() - 1))) - 1)
        obj = 0.5 * (a[name] * tau.pow(2)).sum() - (b[name] * tau).sum() + (u - p_old).pow(2).sum() / (2 * s)
        (g,) = torch.autograd.grad(obj, u)
        assert float(g.abs().max()) < 1e-4


def test_lora_proximal_sweeps_lower_the_proximal_objective_and_each_block_is_optimal():
    pool, a, b, _, _ = quadratic("lora", "iel")
    name, mod = pool.names[-1], pool.vectors[2][-1]
    s = 5.0
    A0, B0 = mod.A.detach().clone(), mod.B.detach().clone()

    def objective(A, B):
        tau = B @ A
        return float(
            0.5 * (a[name] * tau.pow(2)).sum()
            - (b[name] * tau).sum()
            + ((A - A0).pow(2).sum() + (B - B0).pow(2).sum()) / (2 * s)
        )

    from clcompose.strategies.task_vectors import proximal as P

    values = [objective(A0, B0)]
    for sweeps in (1, 2, 5):
        values.append(objective(*P.prox_lora(A0, B0, a[name], b[name], s, sweeps)))
    assert all(v2 <= v1 + 1e-6 for v1, v2 in zip(values, values[1:]))
    # the A-block of one sweep is the exact minimiser over A at B fixed: its gradient there is 0
    A1, _ = P.prox_lora(A0, B0, a[name], b[name], s, 1)
    A = A1.clone().requires_grad_(True)
    tau = B0 @ A
    obj = 0.5 * (a[name] * tau.pow(2)).sum() - (b[name] * tau).sum() + (A - A0).pow(2).sum() / (2 * s)
    (g,) = torch.autograd.grad(obj, A)
    assert float(g.abs().max()) < 1e-4


@pytest.mark.parametrize("style", STYLES)
def test_proximal_step_stays_bounded_where_the_explicit_step_diverges(style):
    """ITA with s·α·max F = 100: 30 explicit steps blow ‖τ‖ up, 30 proximal steps never increase R."""
    from clcompose.strategies.task_vectors import proximal as P

    pool, a, _, _, _ = quadratic(style, "ita")
    top = max(float(v.max()) for v in a.values())
    a = {n: v * (100.0 / top) for n, v in a.items()}  # s = 1, so the stability number is exactly 100
    assert P.stability_number(a) == pytest.approx(100.0)
    if style == "ia3":  # IA3's own curvature Σ_k a W0² is what its explicit step sees; make that 100 too
        c = P.ia3_curvature(a, pool.base_weights())
        a = {n: v * (100.0 / c) for n, v in a.items()}
    mods, base = pool.vectors[2], pool.base_weights()
    norm0 = sum(float(d.detach().norm()) for d in pool.deltas(2).values())

    def penalty():
        with torch.no_grad():
            return sum(float((a[n] * d.pow(2)).sum()) for n, d in pool.deltas(2).items())

    saved = [p.detach().clone() for p in pool.task_parameters(2)]
    with torch.no_grad():
        for _ in range(30):
            for name, mod in zip(pool.names, mods):
                if style == "full":
                    mod.delta.copy_(P.prox_full(mod.delta, a[name], None, 1.0))
                elif style == "ia3":
                    mod.scale.copy_(P.prox_ia3(mod.scale, base[name], a[name], None, 1.0))
                else:
                    A, B = P.prox_lora(mod.A, mod.B, a[name], None, 1.0)
                    mod.A.copy_(A)
                    mod.B.copy_(B)
    with torch.no_grad():
        proximal_norm = sum(float(d.norm()) for d in pool.deltas(2).values())
    proximal_pen = penalty()
    with torch.no_grad():
        for p, v in zip(pool.task_parameters(2), saved):
            p.copy_(v)
    pen0 = penalty()
    for _ in range(30):
        params = pool.task_parameters(2)
        deltas = pool.deltas(2)
        grads = torch.autograd.grad(sum(0.5 * (a[n] * deltas[n].pow(2)).sum() for n in deltas), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(g)
    with torch.no_grad():
        explicit_norm = sum(float(d.norm()) for d in pool.deltas(2).values())
    assert proximal_pen <= pen0 and proximal_norm <= 1.01 * norm0
    assert not explicit_norm < 1e3 * norm0  # diverged (or overflowed to inf/nan)
