"""Meta-learned students (strategies.meta): the functional inner loop against a hand-written autograd
reference, the hypernetwork's generated weights, the run/resume plumbing on teacher streams, and the
must-fail controls."""

import math

import pytest
import torch

from clcompose.bench.models.backbones import MLP, MLPOptions
from clcompose.strategies.meta.learner import MetaStudent, adapt, adapt_batch
from clcompose.strategies.metrics.compositional import soft_kl

B1, B2, EPS = 0.9, 0.999, 1e-8


def _student(kind, seed=0):
    torch.manual_seed(seed)
    return MetaStudent(MLP(MLPOptions(in_features=5, hidden=[7])), n_out=3, kind=kind, templates=4)


def _data(seed=1, n=2, points=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, points, 5, generator=g)
    soft = torch.softmax(2 * torch.randn(n, points, 3, generator=g), -1)
    return x, soft


def _reference_adapt(student, x, soft, steps, lr, wd, create_graph):
    """AdamW written out with torch.autograd.grad, one task at a time."""
    fast = student.init_fast()
    names = list(fast)
    m = {n: torch.zeros_like(v) for n, v in fast.items()}
    v = {n: torch.zeros_like(t) for n, t in fast.items()}
    for k in range(1, steps + 1):
        loss = soft_kl(student(fast, x), soft)
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=create_graph)
        new = {}
        for n, g in zip(names, grads):
            g = g if create_graph else g.detach()
            m[n] = B1 * m[n] + (1 - B1) * g
            v[n] = B2 * v[n] + (1 - B2) * g * g
            mhat, vhat = m[n] / (1 - B1**k), v[n] / (1 - B2**k)
            new[n] = fast[n] - lr * (mhat / (torch.sqrt(vhat + torch.finfo(torch.float32).eps) + EPS) + wd * fast[n])
            if not create_graph:
                new[n] = new[n].detach().requires_grad_(True)
        fast = new
    return fast


@pytest.mark.parametrize("kind", ["hnet", "anil", "maml"])
def test_inner_loop_and_second_order_meta_gradient_match_autograd_reference(kind):
    student = _student(kind)
    x, soft = _data()
    qx, qsoft = _data(seed=2)
    lr, wd, steps = 0.1, 1e-4, 3
    fast = adapt_batch(student, x, soft, steps, lr, wd, create_graph=True)
    loss = torch.stack([soft_kl(student({k: v[i] for k, v in fast.items()}, qx[i]), qsoft[i]) for i in range(2)]).mean()
    meta = student.meta_parameters()
    got = torch.autograd.grad(loss, meta)

    ref_losses = []
    for i in range(2):
        f = _reference_adapt(student, x[i], soft[i], steps, lr, wd, create_graph=True)
        for n in f:
            torch.testing.assert_close(fast[n][i], f[n], rtol=1e-4, atol=1e-5)
        ref_losses.append(soft_kl(student(f, qx[i]), qsoft[i]))
    want = torch.autograd.grad(torch.stack(ref_losses).mean(), meta)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6)
    # first order (FOMAML): the inner steps are constants, the query gradient at the adapted point reaches the init
    fo = adapt_batch(student, x, soft, steps, lr, wd, create_graph=False)
    fo_loss = torch.stack(
        [soft_kl(student({k: v[i] for k, v in fo.items()}, qx[i]), qsoft[i]) for i in range(2)]
    ).mean()
    got_fo = torch.autograd.grad(fo_loss, list(student.fast_init.values()))
    detached = {k: v.detach().requires_grad_(True) for k, v in fo.items()}
    d_loss = torch.stack(
        [soft_kl(student({k: v[i] for k, v in detached.items()}, qx[i]), qsoft[i]) for i in range(2)]
    ).mean()
    want_fo = torch.autograd.grad(d_loss, [detached[k] for k in student.fast_init])
    for g, w in zip(got_fo, want_fo):
        torch.testing.assert_close(g, w.sum(0))


def test_hypernetwork_generates_weights_linearly_from_normalised_embeddings():
    student = _student("hnet")
    fast = {k: torch.randn_like(v) for k, v in student.init_fast().items()}
    w = student.weights(fast)
    for layer in student.layers:
        e = fast[student._key(layer)]
        e_hat = e * math.sqrt(student.templates) / e.norm()
        bank = student.banks[student._key(layer + ".weight")]
        torch.testing.assert_close(w[layer + ".weight"], sum(e_hat[t] * bank[t] for t in range(4)))
        doubled = dict(fast, **{student._key(layer): 3 * e})  # the embedding's scale is normalised away
        torch.testing.assert_close(student.weights(doubled)[layer + ".weight"], w[layer + ".weight"])
    assert sum(v.numel() for v in student.init_fast().values()) == 2 * 4 + 3  # T per layer + output bias
    assert all(not p.requires_grad for p in student.net.parameters())
    anil = _student("anil")
    assert sorted(anil.init_fast()) == ["1__bias", "1__weight"]
    assert len(anil.meta_parameters()) == 4  # body weight/bias + head init weight/bias


def test_adapt_reduces_support_loss_and_pads_context():
    student = _student("hnet")
    x, soft = _data(points=30)
    before = soft_kl(student(student.init_fast(), x[0]), soft[0])
    f = adapt(student, student.init_fast(), x[0], soft[0], 10, 0.3, 1e-4, create_graph=False)
    assert soft_kl(student(f, x[0]), soft[0]) < before
    assert student.pad(x[:, :, :3]).shape[-1] == 5 and torch.equal(
        student.pad(x[:, :, :3])[..., 3:], torch.zeros(2, 30, 2)
    )
