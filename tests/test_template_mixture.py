"""The template-mixture network against ordinary PyTorch networks built from standard modules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clcompose.strategies.templates.network import (
    ProgramNet,
    TaskProgramNet,
    TemplateMixtureNet,
    TemplateMixtureOptions,
    mixture_of,
)


class PlainBlock(nn.Module):
    """The same block with ordinary affine BatchNorm layers: x + bn3(project(relu(bn2(dw(relu(bn1(expand(x))))))))."""

    def __init__(self, c, e, k):
        super().__init__()
        h = c * e
        self.expand, self.bn1 = nn.Conv2d(c, h, 1), nn.BatchNorm2d(h)
        self.depthwise, self.bn2 = nn.Conv2d(h, h, k, padding=k // 2, groups=h), nn.BatchNorm2d(h)
        self.project, self.bn3 = nn.Conv2d(h, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.expand(x)))
        h = F.relu(self.bn2(self.depthwise(h)))
        return x + self.bn3(self.project(h))


RENAME = {"affine1": "bn1", "affine2": "bn2", "affine3": "bn3"}


def plain_block_from(tensors: dict, o) -> PlainBlock:
    block = PlainBlock(o.width, o.expansion, o.kernel)
    with torch.no_grad():
        for name, value in tensors.items():
            module, attr = name.split(".")
            getattr(block, RENAME.get(module, module)).__setattr__(attr, nn.Parameter(value.detach().clone()))
    return block


class PlainNet(nn.Module):
    def __init__(self, body: TemplateMixtureNet, blocks: list[nn.Module]):
        super().__init__()
        o = body.options
        self.stem, self.stem_bn = copy.deepcopy(body.stem), nn.BatchNorm2d(o.width)
        self.blocks = nn.ModuleList(blocks)
        self.adapter, self.adapter_bn = copy.deepcopy(body.adapter), nn.BatchNorm2d(o.feature_dim)
        with torch.no_grad():
            for bn, affine in ((self.stem_bn, body.stem_affine), (self.adapter_bn, body.adapter_affine)):
                bn.weight.copy_(affine.weight)
                bn.bias.copy_(affine.bias)

    def forward(self, x):
        h = F.relu(self.stem_bn(self.stem(x)))
        for b in self.blocks:
            h = b(h)
        return F.relu(self.adapter_bn(self.adapter(h))).mean(dim=(2, 3))


OPTS = dict(blocks=3, width=4, expansion=2, stem_stride=2, feature_dim=6)


def perturbed(body: TemplateMixtureNet) -> TemplateMixtureNet:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in body.parameters():
            p.add_(0.1 * torch.randn_like(p))  # γ ≠ 1, β ≠ 0: the affine terms matter
    return body


def compare(body, mixture, plain, x, steps=2):
    """Outputs in train mode (and the running statistics it leaves), then in eval mode, must agree."""
    norms = body.new_norms()
    for _ in range(steps):
        body.train(), norms.train(), plain.train()
        torch.testing.assert_close(body(x, mixture, norms), plain(x), rtol=1e-5, atol=1e-5)
    body.eval(), norms.eval(), plain.eval()
    torch.testing.assert_close(body(x, mixture, norms), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.blocks[-1][2].running_var, plain.blocks[-1].bn3.running_var)


def test_one_template_is_a_weight_tied_network():
    torch.manual_seed(0)
    o = TemplateMixtureOptions(templates=1, **OPTS)
    body = perturbed(TemplateMixtureNet(o))
    tied = plain_block_from(body.bank.template(0), o)
    blocks = []
    for _ in range(o.blocks):  # L blocks sharing one set of parameters, each with its own statistics
        b = PlainBlock(o.width, o.expansion, o.kernel)
        for name, p in tied.named_parameters():
            module, attr = name.split(".")
            setattr(getattr(b, module), attr, p)
        blocks.append(b)
    plain = PlainNet(body, blocks)
    x = torch.rand(8, 1, 8, 8)
    compare(body, torch.ones(o.blocks, 1), plain, x)
    # the gradient of the single template is the sum over the depths that reuse it (autograd of the tied net)
    body.train(), plain.train()
    body(x, torch.ones(o.blocks, 1), body.new_norms()).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    torch.testing.assert_close(
        body.bank.templates["expand__weight"].grad[0], tied.expand.weight.grad, rtol=1e-4, atol=1e-5
    )


def test_one_hot_programs_with_n_equal_l_are_an_unshared_network():
    torch.manual_seed(0)
    o = TemplateMixtureOptions(templates=3, **OPTS)
    body = perturbed(TemplateMixtureNet(o))
    order = [2, 0, 1]  # any assignment of templates to depths
    plain = PlainNet(body, [plain_block_from(body.bank.template(k), o) for k in order])
    mixture = torch.eye(3)[order]
    x = torch.rand(8, 1, 8, 8)
    compare(body, mixture, plain, x)
    body.train(), plain.train()
    body(x, mixture, body.new_norms()).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    for depth, k in enumerate(order):
        torch.testing.assert_close(
            body.bank.templates["project__weight"].grad[k],
            plain.blocks[depth].project.weight.grad,
            rtol=1e-4,
            atol=1e-5,
        )
    # the "unshared" sharing option is exactly this network with the identity program
    u = TemplateMixtureNet(TemplateMixtureOptions(sharing="unshared", **OPTS))
    assert u.n_templates == 3 and torch.equal(ProgramNet(u).mixture(), torch.eye(3))


def test_soft_programs_mix_every_tensor_convexly():
    """Block ℓ runs with Σ_k softmax(ξ_ℓ)_k W_k, normalisation γ/β included (explicit formula)."""
    torch.manual_seed(0)
    o = TemplateMixtureOptions(templates=2, **OPTS)
    body = perturbed(TemplateMixtureNet(o))
    xi = torch.randn(3, 2)
    w = torch.softmax(xi, dim=1)
    blocks = []
    for layer in range(3):
        t0, t1 = body.bank.template(0), body.bank.template(1)
        blocks.append(plain_block_from({n: w[layer, 0] * t0[n] + w[layer, 1] * t1[n] for n in t0}, o))
    compare(body, mixture_of(xi), PlainNet(body, blocks), torch.rand(8, 1, 8, 8))


def test_parameter_count_of_the_reference_block():
    """C = 40, expansion 6, 3×3 depthwise: 22,920 parameters per template (the reference arithmetic)."""
    body = TemplateMixtureNet(TemplateMixtureOptions(width=40, expansion=6, templates=4, blocks=16))
    assert body.bank.parameters_per_template() == 22_920
    assert sum(p.numel() for p in body.bank.parameters()) == 91_680
    unshared = TemplateMixtureNet(TemplateMixtureOptions(width=40, expansion=6, blocks=16, sharing="unshared"))
    assert sum(p.numel() for p in unshared.bank.parameters()) == 366_720


def test_task_program_net_routes_by_task_label():
    torch.manual_seed(0)
    body = TemplateMixtureNet(TemplateMixtureOptions(templates=2, **OPTS))
    net = TaskProgramNet(body)
    net.add_task(0, [0, 1])
    net.add_task(1, [2, 3, 4])
    with pytest.raises(ValueError):
        net.add_task(2, [4, 5])  # classes belong to one task
    net.eval()
    x = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([1, 0, 1, 5, 0, 1])  # task 5 was never learned
    out = net(x, labels)
    assert out.shape == (6, 5)
    for i, t in enumerate(labels.tolist()):
        if t == 5:
            assert (out[i] == -1e4).all()
            continue
        expected = net.heads[str(t)](body(x[i : i + 1], mixture_of(net.programs[str(t)]), net.norms[str(t)]))[0]
        cols = net.head_classes[t]
        torch.testing.assert_close(out[i, cols], expected)
        others = [c for c in range(5) if c not in cols]
        assert (out[i, others] == -1e4).all()
    assert [p.shape for p in net.task_parameters(1)] == [(3, 2), (3, 6), (3,)]


def test_vector_inputs_run_as_one_by_one_images():
    body = TemplateMixtureNet(
        TemplateMixtureOptions(in_channels=5, stem_stride=1, blocks=2, width=4, expansion=2, feature_dim=3)
    )
    out = ProgramNet(body)(torch.randn(7, 5))
    assert out.shape == (7, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="input channels"):
        ProgramNet(body)(torch.randn(7, 4))
