"""The batched per-example Fisher (hooks + one backward per class) against the per-example vmap reference."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clcompose.strategies.core.fisher import fisher_sum
from clcompose.strategies.core.per_example import UnsupportedLayer, layer_fisher_sum, supported


def _targets(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _compare(model: nn.Module, x: torch.Tensor, mode: str, rtol: float = 1e-5, root: nn.Module | None = None):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    modules = _targets(model)
    params = {n: m.weight for n, m in modules.items()}

    def one(weights, xi):
        return F.log_softmax(functional_call(model, dict(weights), (xi.unsqueeze(0),), strict=False)[0], dim=-1)

    ref, n_ref = fisher_sum(one, params, [x], mode=mode, k=2, chunk=7)
    fast, n_fast = layer_fisher_sum(
        lambda xb: F.log_softmax(model(xb), dim=-1), modules, [x[:5], x[5:]], mode=mode, k=2, chunk=3, root=root
    )
    assert n_ref == n_fast == len(x)
    for n in params:
        scale = ref[n].abs().max().clamp_min(1e-12)
        assert torch.allclose(fast[n], ref[n], rtol=rtol, atol=1e-6 * float(scale)), (
            n,
            (fast[n] - ref[n]).abs().max(),
            scale,
        )


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_mlp(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    _compare(model, torch.randn(11, 6), mode)


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_cnn_with_strides_padding_dilation_and_groups(mode):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=2, dilation=2, groups=6),  # depthwise
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),  # pointwise
        nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), groups=2, bias=False),
        nn.Flatten(),
        nn.LazyLinear(5),
    )
    x = torch.randn(9, 3, 10, 10)
    model(x)  # materialise the lazy layer
    _compare(model, x, mode)


def test_efficientnet_lite0_static_same_padding_convs():
    """Depthwise and pointwise convolutions with TF-style static 'same' padding, BatchNorm in eval mode."""
    from clcompose.bench.models.backbones import EfficientNetLite0, EfficientNetOptions

    torch.manual_seed(2)
    backbone = EfficientNetLite0(EfficientNetOptions(image_size=32, pretrained=False))
    model = nn.Sequential(backbone, nn.Linear(1280, 6))
    assert all(supported(m) for m in _targets(model).values())
    _compare(model, torch.rand(6, 1, 28, 28), "exact", rtol=1e-4)
    _compare(model, torch.rand(6, 1, 28, 28), "exact", rtol=1e-4, root=model)  # BatchNorm as affine maps


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_batchnorms_run_as_their_affine_map_in_the_captured_forward(channels_last):
    """With ``root``, eval-mode BatchNorm layers compute x·γ/√(σ²+ε) + β − μγ/√(σ²+ε) during the Fisher's
    forward: the same outputs as batch_norm (to rounding) and the same Fisher as the vmap reference; the layers
    are themselves again afterwards (the hooks are removed), and training-mode BatchNorm is left alone."""
    from clcompose.strategies.core.per_example import LayerCapture

    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, 4),
    )
    for bn in (model[1], model[5]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    model.eval()
    x = torch.randn(8, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare(model, x, "exact", root=model)
    capture = LayerCapture(_targets(model), root=model)
    out, _ = capture.forward(model, x)
    assert torch.allclose(out, model(x), rtol=1e-5, atol=1e-6)
    assert out.grad_fn is not None and not model[1]._forward_hooks and not model[5]._forward_hooks
    for bn in (model[1], model[5]):  # batch statistics: not an affine map of running ones, so not replaced
        bn.momentum = 0.0  # (running statistics left as they are by each forward)
        bn.train()
    out, _ = capture.forward(model, x)
    assert torch.equal(out.detach(), model(x).detach())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the vmap reference on attention
def test_tiny_vit_token_linears():
    """qkv, proj, fc1, fc2 act on (B, tokens, d): per-example gradients sum over tokens before squaring."""
    import timm

    torch.manual_seed(3)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=24,
        num_heads=2,
    )
    model = nn.Sequential(vit, nn.Linear(24, 5))
    _compare(model, torch.randn(6, 3, 32, 32), "exact", rtol=1e-4)


def test_sampled_labels_use_the_generator_and_weight_one_over_samples():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).eval()
    modules = _targets(model)
    x = torch.randn(400, 5)

    def run(seed, samples):
        return layer_fisher_sum(
            lambda xb: F.log_softmax(model(xb), -1),
            modules,
            [x],
            mode="sampled",
            samples=samples,
            generator=torch.Generator().manual_seed(seed),
        )[0]

    a, b = run(0, 4), run(0, 4)
    assert all(torch.equal(a[n], b[n]) for n in a)  # seeded
    exact = layer_fisher_sum(lambda xb: F.log_softmax(model(xb), -1), modules, [x], mode="exact")[0]
    many = run(1, 64)
    for n in exact:  # unbiased: 64 labels per example over 400 examples land close to the exact sum
        assert torch.allclose(many[n], exact[n], rtol=0.1, atol=0.02 * float(exact[n].abs().max()))


def test_unsupported_layers_are_refused():
    class Odd(nn.Conv2d):
        def forward(self, x):  # a padding the formulas cannot see
            return super().forward(F.pad(x, (1, 0, 1, 0)))

    with pytest.raises(UnsupportedLayer):
        layer_fisher_sum(lambda x: x, {"odd.weight": Odd(2, 2, 3)}, [torch.zeros(1, 2, 4, 4)])


def _explicit_squares(layer: nn.Module, x: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Σ_b Σ_j g_bj² of ``layer.weight`` by explicit per-example autograd, one example and one pass at a time."""
    explicit = torch.zeros_like(layer.weight)
    for b in range(x.shape[0]):
        for d in deltas:
            (g,) = torch.autograd.grad(layer(x[b : b + 1]), layer.weight, d[b : b + 1])
            explicit += g.pow(2)
    return explicit


@pytest.mark.parametrize("groups", [1, 3, 6])
@pytest.mark.parametrize("size", [1, 2, 5, 9])
@pytest.mark.parametrize("passes", [1, 4])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_route_of_the_layer_squares_agrees_with_explicit_per_example_gradients(
    groups, size, passes, dilation, channels_last
):
    """Expanded square, per-example routes (batched matmul; grouped: a loop over positions up to 4, the
    convolution's weight-gradient kernel beyond: 9 and 81 positions at sizes 5 and 9; size 1: one output position,
    whose receptive field is sliced rather than unfolded; depthwise (groups 6) with 4 or 9 positions, no more than the
    kernel's 9 taps: a sum over the positions' strided input windows) and the automatic choice, against per-example
    autograd gradients over several passes."""
    from clcompose.strategies.core import layer_squares

    torch.manual_seed(size * 10 + groups)
    out = 6 if groups == 6 else 9
    conv = nn.Conv2d(6, out, 3, padding=dilation, dilation=dilation, stride=2 if size == 5 else 1, groups=groups)
    conv = conv.double()
    x = torch.randn(4, 6, size, size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    deltas = [torch.randn_like(conv(x)) for _ in range(passes)]
    explicit = _explicit_squares(conv, x, deltas)
    for route in ("expanded", "per-example", None):
        squares = layer_squares.LayerSquares(conv, x, passes, chunk=3, route=route)
        for d in deltas:
            squares.add(d)
        assert torch.allclose(squares.total(), explicit, rtol=1e-12, atol=1e-12), route


@pytest.mark.parametrize(
    "size, kernel, stride, dilation, live",
    [
        (1, 5, 1, 1, (1, 1)),  # EfficientNet-Lite0's last stage at 32 px: the centre tap alone
        (2, 5, 1, 1, (3, 3)),  # its 2 × 2 stage: 9 of 25 taps
        (2, 4, 1, 1, (3, 3)),  # an even kernel: uneven padding, the live taps start at the kernel's edge
        (1, 3, 2, 1, (1, 1)),  # strided
        (2, 3, 1, 2, (1, 1)),  # dilated: the rows around the centre sit on padding
        (4, 5, 1, 1, (5, 5)),  # every tap sees input: nothing cropped
    ],
)
@pytest.mark.parametrize("groups", [1, 4])
def test_taps_that_see_only_padding_are_left_out_and_stay_exactly_zero(size, kernel, stride, dilation, live, groups):
    """A static-'same' convolution (efficientnet's Conv2dStaticSamePadding) on an input smaller than its kernel:
    the layer squares are formed on the taps that see input (a rectangle of the kernel), the other taps' Fisher is
    exactly 0, and every route (expanded, per-example — batched matmul, depthwise windows, weight-gradient kernel —
    and the automatic choice) equals explicit per-example autograd gradients over several passes."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from clcompose.strategies.core import layer_squares

    torch.manual_seed(size + kernel + groups)
    conv = Conv2dStaticSamePadding(
        4, 4, kernel, stride=stride, image_size=size, groups=groups, dilation=dilation, bias=False
    ).double()
    x = torch.randn(5, 4, size, size, dtype=torch.float64)
    deltas = [torch.randn_like(conv(x)) for _ in range(3)]
    explicit = _explicit_squares(conv, x, deltas)
    taps = layer_squares._LiveTaps(conv, x, list(deltas[0].shape[2:]))
    assert taps.kernel == live and taps.cropped == (live != (kernel, kernel))
    i0, j0 = taps.start
    dead = torch.ones_like(explicit, dtype=torch.bool)
    dead[:, :, i0 : i0 + live[0], j0 : j0 + live[1]] = False
    assert torch.equal(explicit[dead], torch.zeros_like(explicit[dead]))  # what autograd says of the dead taps
    for route in ("expanded", "per-example", None):
        squares = layer_squares.LayerSquares(conv, x, len(deltas), chunk=2, route=route)
        for d in deltas:
            squares.add(d)
        total = squares.total()
        assert torch.equal(total[dead], torch.zeros_like(total[dead])), route
        assert torch.allclose(total, explicit, rtol=1e-12, atol=1e-12), route


def test_static_paddings_keep_a_channels_last_input_channels_last_in_the_captured_forward():
    """At one spatial position a tensor is in both layouts and ``F.pad`` returns it channels-first; during the
    Fisher's forward (only) the static padding of a targeted convolution hands it on channels-last, the same values.
    A channels-first input keeps its layout."""
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    from clcompose.strategies.core.per_example import LayerCapture, _padded_channels_last

    torch.manual_seed(3)
    conv = Conv2dStaticSamePadding(6, 6, 5, image_size=1, groups=6, bias=False)
    pad = conv.static_padding
    x = torch.randn(3, 6, 1, 1).contiguous(memory_format=torch.channels_last)
    plain = pad(x)
    assert not plain.is_contiguous(memory_format=torch.channels_last)  # what F.pad alone returns
    kept = _padded_channels_last(pad, (x,), plain)
    assert kept.is_contiguous(memory_format=torch.channels_last) and torch.equal(kept, plain)
    wide = torch.randn(3, 6, 4, 4)  # channels-first, and unambiguously so
    assert _padded_channels_last(pad, (wide,), pad(wide)) is None
    hooks = []
    out, _ = LayerCapture({"conv": conv}).forward(lambda b: hooks.append(len(pad._forward_hooks)) or conv(b), x)
    assert hooks == [1] and not pad._forward_hooks  # on during the captured forward only
    assert torch.equal(out, conv(x))


def test_exact_output_vectors_factorise_diag_p_minus_ppT_in_one_pass_fewer_than_classes():
    from clcompose.strategies.core.per_example import output_vectors

    torch.manual_seed(5)
    logp = F.log_softmax(torch.randn(7, 5, dtype=torch.float64) * 3, dim=-1)
    p = logp.exp()
    vectors = output_vectors(logp, "exact")
    assert len(vectors) == 4
    stacked = torch.stack(vectors, dim=2)  # (B, C, C-1)
    want = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    assert torch.allclose(stacked @ stacked.transpose(1, 2), want, atol=1e-12)
    assert torch.allclose(stacked.sum(1), torch.zeros(7, 4, dtype=torch.float64), atol=1e-12)  # 1ᵀ v = 0
    assert output_vectors(logp[:, :1] - logp[:, :1], "exact") == []  # one class: no information


@pytest.mark.parametrize("tokens", [None, 1, 6])
def test_both_routes_of_the_layer_squares_on_linear_layers_with_and_without_tokens(tokens):
    from clcompose.strategies.core.per_example import LayerSquares

    torch.manual_seed(tokens or 0)
    linear = nn.Linear(5, 4).double()
    x = torch.randn(3, 5, dtype=torch.float64) if tokens is None else torch.randn(3, tokens, 5, dtype=torch.float64)
    deltas = [torch.randn_like(linear(x)) for _ in range(3)]
    explicit = _explicit_squares(linear, x, deltas)
    for route in ("expanded", "per-example"):
        squares = LayerSquares(linear, x, 3, chunk=2, route=route)
        for d in deltas:
            squares.add(d)
        assert torch.allclose(squares.total(), explicit, rtol=1e-12, atol=1e-12), route


def test_a_scratch_buffer_shared_by_layers_gives_the_freshly_allocated_formula_bit_for_bit():
    """The per-example route writes every layer's chunked gradients into one shared buffer and squares them in
    place; the sums must be those of forming each chunk's gradients afresh and squaring them, bit for bit, with
    layers of different sizes alternating on the buffer and a last chunk smaller than the others."""
    from clcompose.strategies.core.layer_squares import LayerSquares, Scratch

    torch.manual_seed(0)
    big, small = nn.Linear(6, 9), nn.Conv2d(4, 3, 1)  # tokens as positions; a pointwise conv's pixels
    xb, xs = torch.randn(5, 7, 6), torch.randn(5, 4, 3, 3)
    deltas = {big: [torch.randn(5, 7, 9) for _ in range(3)], small: [torch.randn(5, 3, 3, 3) for _ in range(3)]}
    scratch = Scratch()
    squares = {
        m: LayerSquares(m, x, 3, chunk=2, route="per-example", scratch=scratch) for m, x in ((big, xb), (small, xs))
    }
    for j in range(3):
        for m in (big, small):
            squares[m].add(deltas[m][j])

    def written_out(u, ds):  # u: (B, I, L); each d: (B, O, L)
        total = torch.zeros(ds[0].shape[1], u.shape[1])
        for d in ds:
            for s in range(0, u.shape[0], 2):
                g = torch.bmm(d[s : s + 2], u[s : s + 2].transpose(1, 2))
                total += g.pow(2).sum(0)
        return total

    expected_big = written_out(xb.transpose(1, 2), [d.transpose(1, 2) for d in deltas[big]])
    expected_small = written_out(xs.flatten(2), [d.flatten(2) for d in deltas[small]])
    assert torch.equal(squares[big].total(), expected_big)
    assert torch.equal(squares[small].total(), expected_small.reshape(small.weight.shape))
    assert scratch._buffer.numel() == 2 * 9 * 6  # the largest chunk's gradients, kept and reused
