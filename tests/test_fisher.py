"""The diagonal true Fisher against the explicit Σ_c p_c (∇ log p_c)², per example, on a small MLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clcompose.strategies.core.fisher import FisherAccumulator, fisher_sum


def setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    params = {n: p.detach() for n, p in net.named_parameters()}
    x = torch.randn(11, 5)

    def log_prob(p, xi):
        return F.log_softmax(functional_call(net, p, (xi.unsqueeze(0),))[0], dim=-1)

    return net, params, x, log_prob


def explicit_fisher(net, x):
    """Σ_n Σ_c p_c (∂ log p_c/∂θ)² with one autograd call per example and class."""
    total = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for xi in x:
        logp = F.log_softmax(net(xi.unsqueeze(0))[0], dim=-1)
        for c in range(logp.shape[0]):
            grads = torch.autograd.grad(logp[c], list(net.parameters()), retain_graph=True)
            for (n, _), g in zip(net.named_parameters(), grads):
                total[n] += logp[c].exp().detach() * g.pow(2)
    return total


def test_exact_fisher_equals_the_explicit_per_example_sum():
    net, params, x, log_prob = setup()
    got, count = fisher_sum(log_prob, params, [x[:6], x[6:]], mode="exact", chunk=4)
    want = explicit_fisher(net, x)
    assert count == 11
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_fisher_is_not_the_squared_batch_gradient():
    net, params, x, log_prob = setup()
    got, _ = fisher_sum(log_prob, params, [x], mode="exact")
    logp = F.log_softmax(net(x), dim=-1)
    batch = torch.autograd.grad((logp.exp().detach() * logp).sum(), list(net.parameters()))
    assert not torch.allclose(got["0.weight"], batch[0].pow(2))


def test_topk_with_all_classes_is_exact_and_smaller_k_is_a_lower_bound():
    _, params, x, log_prob = setup()
    exact, _ = fisher_sum(log_prob, params, [x], mode="exact")
    full, _ = fisher_sum(log_prob, params, [x], mode="topk", k=4)
    top1, _ = fisher_sum(log_prob, params, [x], mode="topk", k=1)
    for n in exact:
        torch.testing.assert_close(full[n], exact[n], rtol=1e-5, atol=1e-7)
        assert (top1[n] <= exact[n] + 1e-7).all()


def test_sampled_fisher_is_unbiased_and_seeded():
    _, params, x, log_prob = setup()
    exact, _ = fisher_sum(log_prob, params, [x], mode="exact")
    mc, _ = fisher_sum(log_prob, params, [x], mode="sampled", samples=4000, generator=torch.Generator().manual_seed(0))
    rel = (mc["2.weight"] - exact["2.weight"]).abs().sum() / exact["2.weight"].abs().sum()
    assert rel < 0.05
    a, _ = fisher_sum(log_prob, params, [x], mode="sampled", generator=torch.Generator().manual_seed(5))
    b, _ = fisher_sum(log_prob, params, [x], mode="sampled", generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_accumulator_past_and_cumulative_with_unequal_counts():
    acc = FisherAccumulator(eps=1e-5)
    like = {"w": torch.zeros(2)}
    u = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0]), torch.tensor([7.0, 11.0])]
    for s, n in zip(u, [10, 30, 20]):
        acc.add({"w": s}, n)
    torch.testing.assert_close(acc.past(0, like)["w"], torch.full((2,), 1e-5))
    torch.testing.assert_close(acc.past(2, like)["w"], (1e-5 + u[0] + u[1]) / 40)
    torch.testing.assert_close(acc.upto(0)["w"], 1e-5 + u[0] / 10)
    torch.testing.assert_close(acc.upto(2)["w"], 1e-5 + (u[0] + u[1] + u[2]) / 60)


def test_unknown_mode_is_rejected():
    _, params, x, log_prob = setup()
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        fisher_sum(log_prob, params, [x], mode="diagonal-ish")
