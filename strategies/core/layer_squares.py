"""Per-example squared weight gradients of one Linear or Conv2d layer from its input and its output gradients.

For a layer with input activations a and output gradients δ of one example, the weight gradient is
g = Σ_positions δ aᵀ (positions: tokens of a Linear on (B, T, d) inputs, pixels of a convolution, none for a
plain (B, d) input). :class:`LayerSquares` turns a batch's δ of each backward pass into Σ_b g_b² without a
per-example backward pass — for layers with few positions by one matmul per layer whatever the number of passes
(the expanded square; (Σ δ²)ᵀ a² for a dense layer), else per example by one batched matmul, or by a sum of outer
products over positions for grouped and depthwise convolutions. A convolution's sums cover only the kernel taps
that see real input (:class:`_LiveTaps`). :mod:`clcompose.strategies.core.per_example` captures a and δ with
hooks and builds the Fisher from these squares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayer(TypeError):
    """A targeted layer that the batched formulas do not cover (the caller falls back to per-example vmap)."""


def supported(module: nn.Module) -> bool:
    """Linear layers, and Conv2d layers with numeric zero padding (also TF-style static 'same' padding modules; a
    ``padding="same"``/``"valid"`` string is left to the vmap backend)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        static = getattr(module, "static_padding", None)
        dynamic = type(module).forward is not nn.Conv2d.forward and static is None
        return module.padding_mode == "zeros" and not dynamic and not isinstance(module.padding, str)
    return False


def _conv_input(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    static = getattr(module, "static_padding", None)  # efficientnet's Conv2dStaticSamePadding pads before conv2d
    return static(a) if static is not None else a


def _zero_padded(module: nn.Conv2d, padded: torch.Tensor) -> torch.Tensor:
    """The input a convolution with ``module.padding`` sees (its zero padding applied; ``padded`` has the static one)."""
    pad = [p for p in reversed(module.padding) for _ in (0, 1)]
    return F.pad(padded, pad) if any(pad) else padded


class _LiveTaps:
    """The kernel taps of a convolution that see its real input at some output position, as a rectangle
    rows [i0, i0 + kh) × columns [j0, j0 + kw) of the kernel, for an input of a given size. A tap outside it sees
    only padding: its weight's per-example gradients, hence its Fisher, are exactly zero, and the layer's squares are
    formed on the live taps alone, over the part of the padded input they see (:meth:`crop`). EfficientNet-Lite0's
    5 × 5 depthwise kernels at 32 px see a 1 × 1 input with 1 of their 25 taps and a 2 × 2 one with 9."""

    def __init__(self, module: nn.Conv2d, a: torch.Tensor, sizes: list[int]):
        mask = _zero_padded(module, _conv_input(module, a.new_ones(1, 1, *a.shape[2:])))
        self.full_kernel = tuple(module.kernel_size)
        self.dilation, self.stride = tuple(module.dilation), tuple(module.stride)
        self.sizes = sizes
        starts, kernel = [], []
        for axis, (k, d, st, n) in enumerate(zip(self.full_kernel, self.dilation, self.stride, sizes)):
            real = mask.amax(dim=3 - axis)[0, 0] > 0  # padded rows (axis 0) or columns (axis 1) holding input
            live = [i for i in range(k) if bool(real[i * d : i * d + st * (n - 1) + 1 : st].any())]
            first, last = (live[0], live[-1]) if live else (0, k - 1)
            starts.append(first)
            kernel.append(last - first + 1)
        self.start, self.kernel = tuple(starts), tuple(kernel)
        self.cropped = self.kernel != self.full_kernel

    def crop(self, full: torch.Tensor) -> torch.Tensor:
        """The part of the fully padded input ``full`` that the live taps see (the live taps' kernel at offset 0
        then gives the same output positions, with no padding)."""
        if not self.cropped:
            return full
        (i0, j0), (kh, kw), (dh, dw), (sh, sw) = self.start, self.kernel, self.dilation, self.stride
        rows = (self.sizes[0] - 1) * sh + (kh - 1) * dh + 1
        cols = (self.sizes[1] - 1) * sw + (kw - 1) * dw + 1
        return full[:, :, i0 * dh : i0 * dh + rows, j0 * dw : j0 * dw + cols]

    def expand(self, sums: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Sums over the live taps (…, C_in/g · kh · kw, live) in the weight's full ``shape``, zero elsewhere."""
        if not self.cropped:
            return sums.reshape(shape)
        full = sums.new_zeros(shape)
        (i0, j0), (kh, kw) = self.start, self.kernel
        full[:, :, i0 : i0 + kh, j0 : j0 + kw] = sums.reshape(*shape[:2], kh, kw)
        return full

    def window(self, x: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
        """The live taps' window of the cropped input ``x`` (:meth:`crop`) that output position (oh, ow) sees, as a
        strided view."""
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        return x[:, :, oh * sh : oh * sh + dh * (kh - 1) + 1 : dh, ow * sw : ow * sw + dw * (kw - 1) + 1 : dw]


def _pair_products(x: torch.Tensor, weighted: bool) -> torch.Tensor:
    """(L, ...) → (P, ...): x_l ⊙ x_m over the P = L(L+1)/2 position pairs l ≤ m, times their weight in a sum over
    all (l, m) — 1 on the diagonal, 2 off it — when ``weighted`` (one of the expanded square's two factors)."""
    parts = []
    for first in range(x.shape[0]):
        part = x[first] * x[first:]
        if weighted:
            part[1:] *= 2
        parts.append(part)
    return torch.cat(parts)


EXPANDED_MAX_NUMBERS = 1 << 25
"""The most numbers (about 128 MB in float32) the expanded square may hold per layer; beyond, per-example."""

GROUPED_LOOP_MAX_POSITIONS = 4
"""Grouped (not depthwise) convolutions with more output positions form per-example gradients with the
convolution's own weight-gradient kernel (one group per example and group) rather than a loop over positions,
whose unfolded input costs more to lay out than it saves beyond 4 positions (measured on EfficientNet-Lite0's
depthwise layers, 1–9 passes, before they had a route of their own)."""


class Scratch:
    """One reusable buffer for the per-example gradients of every layer of a Fisher estimate, which are formed one
    layer and one chunk at a time. Writing each chunk's (n, O, I) gradients into fresh memory cost as much as the
    batched matmul that forms them (large allocations come fresh from the system: page faults and zeroed pages),
    and their square another such allocation; reused, and squared in place, the same numbers take about half the
    time (measured on ViT-B/16's layers). The buffer grows to the largest chunk it is asked for."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def tensor(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device, on the buffer."""
        numel = math.prod(shape)
        b = self._buffer
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            self._buffer = b = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel].view(shape)


class LayerSquares:
    """Σ_j Σ_b g_bj², elementwise, of one Linear/Conv2d weight over the examples b of a batch and the backward
    passes j of a Fisher estimate, from the layer's input ``a`` (given once) and one output gradient per pass
    (:meth:`add`); :meth:`total` has the weight's shape.

    Per group of the layer, g_bj = Σ_l d_bjl u_blᵀ over L positions (tokens of a Linear on (B, T, d) inputs,
    output pixels of a convolution with u = unfold(input), none for a plain (B, d) input). A convolution's u holds
    only its live taps (:class:`_LiveTaps`: the others see nothing but padding, and their sums stay exactly 0).
    Two exact routes, by arithmetic cost for the announced number of ``passes``:

    - expanded square: Σ_j Σ_b g_bj² = Σ_b Σ_{l≤m} w_lm (Σ_j d_bjl ⊙ d_bjm)(u_bl ⊙ u_bm)ᵀ (w: 1 on the diagonal,
      2 off it). The sum over passes folds into the output factor, so a pass costs one elementwise product and the
      layer one matmul for all of them; L = 1 is the dense layer's (Σ_j δ_j²)ᵀ a².
    - per-example: g_bj formed in chunks of ``chunk`` examples, squared and summed — by one batched matmul per
      chunk for ungrouped layers; for depthwise ones (one input and one output channel per group) with 2 to kh·kw
      positions, by a sum over the positions of their input windows, strided views of the padded input with nothing
      unfolded (:meth:`_add_depthwise`); for other grouped ones by a sum of L outer products with few positions, by
      the convolution's weight-gradient kernel with one group per example and group beyond.

    ``route`` forces one (``"expanded"`` or ``"per-example"``); by default depthwise layers with 2 to kh·kw
    positions take the strided per-example route (measured 2–6× faster than the others on EfficientNet-Lite0's,
    1–9 passes), and other layers the cheaper route whose expanded factors fit in :data:`EXPANDED_MAX_NUMBERS`.
    The batched matmul writes into ``scratch`` (:class:`Scratch`, shared by the layers of one estimate; by default
    the layer's own), and every per-example route squares its gradients in place.
    """

    def __init__(
        self,
        module: nn.Module,
        a: torch.Tensor,
        passes: int,
        chunk: int = 64,
        route: str | None = None,
        scratch: Scratch | None = None,
    ):
        self.module, self.chunk, self.shape = module, chunk, module.weight.shape
        self.scratch = scratch if scratch is not None else Scratch()
        batch = a.shape[0]
        if isinstance(module, nn.Linear):  # one group; positions: the tokens of a (B, T, d) input, none of (B, d)
            unfolded = a.unsqueeze(-1) if a.dim() == 2 else a.flatten(1, -2).transpose(1, 2)
            self.groups, out_per_group, in_per_group = 1, module.out_features, module.in_features
            positions = unfolded.shape[-1]
            self.taps = None
        else:
            padded = _conv_input(module, a)
            self.groups = module.groups
            sizes = [
                (n + 2 * pad - dil * (k - 1) - 1) // stride + 1
                for n, pad, dil, k, stride in zip(
                    padded.shape[2:], module.padding, module.dilation, module.kernel_size, module.stride
                )
            ]
            positions = sizes[0] * sizes[1]
            self.taps = _LiveTaps(module, a, sizes)
            out_per_group = module.out_channels // module.groups
            in_per_group = module.in_channels // module.groups * self.taps.kernel[0] * self.taps.kernel[1]
        groups = self.groups
        pairs = positions * (positions + 1) // 2
        expanded_cost = batch * groups * pairs * (passes * out_per_group + in_per_group + out_per_group * in_per_group)
        per_example_cost = passes * batch * groups * out_per_group * in_per_group * (positions + 1)
        expanded_numbers = batch * groups * pairs * (out_per_group + in_per_group)
        self.expanded = expanded_cost <= per_example_cost and expanded_numbers <= EXPANDED_MAX_NUMBERS
        depthwise = isinstance(module, nn.Conv2d) and groups > 1 and groups == module.in_channels == module.out_channels
        depthwise = depthwise and 1 < positions <= in_per_group  # no more positions than live kernel taps
        if depthwise:
            self.expanded = False
        if route is not None:  # "expanded" or "per-example" (tests)
            self.expanded = route == "expanded"
        self.out_per_group, self.in_per_group, self.positions = out_per_group, in_per_group, positions
        # per-example routes: a batched matmul for ungrouped layers, u (B, I, L); for depthwise ones strided windows
        # of the padded input (nothing unfolded); for other grouped ones with few positions a sum of outer products,
        # u positions first (L, B, G, I); with many, the convolution's weight-gradient kernel
        self.depthwise = depthwise and not self.expanded
        self.batched_matmul = groups == 1 and not self.expanded
        self.weight_gradient = (
            groups > 1 and not self.expanded and not self.depthwise and positions > GROUPED_LOOP_MAX_POSITIONS
        )
        seen = None  # a convolution's padded input where its live taps see it, padding included
        if self.taps is not None:
            seen = self.taps.crop(_zero_padded(module, padded))
        self.input = seen if self.depthwise else None
        if self.weight_gradient:  # per chunk, one (1, n · C_in, H, W) image: one group per example and group
            self.images = [x.reshape(1, -1, *x.shape[2:]) for x in torch.split(seen, chunk)]
        if not (self.weight_gradient or self.depthwise):
            if not isinstance(module, nn.Linear) and positions == 1:  # the receptive field is one window: slice it
                unfolded = self.taps.window(seen, 0, 0).reshape(batch, -1, 1)
            elif not isinstance(module, nn.Linear):
                unfolded = F.unfold(seen, self.taps.kernel, dilation=module.dilation, stride=module.stride)
            if unfolded.shape[-1] != positions:
                raise UnsupportedLayer(f"{type(module).__name__}: unfolded input does not match its output")
            u = unfolded.reshape(batch, groups, in_per_group, positions)
        if self.batched_matmul:
            self.u = u[:, 0]
        elif not (self.weight_gradient or self.depthwise):
            self.u = u.permute(3, 0, 1, 2).contiguous()
        self.folded: torch.Tensor | None = None  # expanded: Σ_j weighted pair products of d_j, (P, B, G, O)
        dtype = torch.promote_types(a.dtype, torch.float32)  # low-precision activations sum in float32
        self.sums = a.new_zeros(groups, out_per_group, in_per_group, dtype=dtype)

    def add(self, delta: torch.Tensor) -> None:
        """One backward pass: the gradient of the pass's loss with respect to the layer's output."""
        if self.depthwise:
            self._add_depthwise(delta)
            return
        batch, groups, out = delta.shape[0], self.groups, self.out_per_group
        if isinstance(self.module, nn.Linear):
            delta = delta.unsqueeze(-1) if delta.dim() == 2 else delta.flatten(1, -2).transpose(1, 2)
        d = delta.reshape(batch, groups, out, self.positions)
        if self.batched_matmul:
            for s in range(0, batch, self.chunk):
                dc, uc = d[s : s + self.chunk, 0], self.u[s : s + self.chunk].transpose(1, 2)
                g = torch.bmm(dc, uc, out=self.scratch.tensor((dc.shape[0], dc.shape[1], uc.shape[2]), dc))
                self.sums[0] += g.mul_(g).sum(0)  # x · x: what pow(2) computes, without a second allocation
            return
        if self.weight_gradient:
            self._add_weight_gradients(delta)
            return
        d = d.permute(3, 0, 1, 2).contiguous()  # (L, B, G, O)
        if self.expanded:
            products = _pair_products(d, weighted=True)
            self.folded = products if self.folded is None else self.folded.add_(products)
            return
        for s in range(0, batch, self.chunk):  # grouped: g_b = Σ_l d_bl u_blᵀ per group
            u, dc = self.u[:, s : s + self.chunk], d[:, s : s + self.chunk]
            g = dc[0].unsqueeze(-1) * u[0].unsqueeze(-2)
            for position in range(1, self.positions):
                g.addcmul_(dc[position].unsqueeze(-1), u[position].unsqueeze(-2))
            self.sums += g.mul_(g).sum(0)

    def _add_depthwise(self, delta: torch.Tensor) -> None:
        """Depthwise, no more output positions than kernel taps: g_b[c] = Σ_(oh, ow) δ_b[c, oh, ow] W_b[c, oh, ow] over
        the kh × kw windows W of the padded input a that the output positions see (strided views of a)."""
        ho, wo = delta.shape[2:]
        for s in range(0, delta.shape[0], self.chunk):
            x, d = self.input[s : s + self.chunk], delta[s : s + self.chunk]
            g = None
            for oh in range(ho):
                for ow in range(wo):
                    window = self.taps.window(x, oh, ow)
                    weight = d[:, :, oh : oh + 1, ow : ow + 1]
                    g = weight * window if g is None else g.addcmul_(weight, window)
            self.sums += g.mul_(g).sum(0).reshape(self.sums.shape)

    def _add_weight_gradients(self, delta: torch.Tensor) -> None:
        m = self.module
        for image, d in zip(self.images, torch.split(delta, self.chunk)):
            n = d.shape[0]
            g = torch.nn.grad.conv2d_weight(
                image,
                (n * m.out_channels, m.in_channels // m.groups, *self.taps.kernel),
                d.reshape(1, n * d.shape[1], *d.shape[2:]),
                stride=m.stride,
                dilation=m.dilation,
                groups=n * m.groups,
            )
            g = g.reshape(n, self.groups, self.out_per_group, self.in_per_group)
            self.sums += g.mul_(g).sum(0)

    def total(self) -> torch.Tensor:
        """Σ_j Σ_b g_bj² in the weight's shape."""
        if self.expanded and self.folded is not None:
            uu = _pair_products(self.u, weighted=False).flatten(0, 1)  # (P·B, G, I)
            dd = self.folded.flatten(0, 1)  # (P·B, G, O)
            if self.groups == 1:
                self.sums[0] += dd[:, 0].T @ uu[:, 0]
            elif self.out_per_group == 1:  # depthwise
                self.sums[:, 0] += torch.einsum("ng,ngi->gi", dd[:, :, 0], uu)
            else:
                self.sums += torch.bmm(dd.permute(1, 2, 0), uu.permute(1, 0, 2))
        if self.taps is not None:
            return self.taps.expand(self.sums, self.shape)
        return self.sums.reshape(self.shape)
