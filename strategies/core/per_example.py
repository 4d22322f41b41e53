"""Per-example squared weight gradients of Linear and Conv2d layers at the cost of batched backward passes.

For a layer with input activations a and output gradients δ of one example, the weight gradient is
g = Σ_positions δ aᵀ (positions: tokens of a Linear on (B, T, d) inputs, pixels of a convolution, none for a
plain (B, d) input). Forward hooks keep a and the layer outputs; ``torch.autograd.grad`` of a *batch* loss with
respect to those outputs gives every example's δ at once (examples do not interact: BatchNorm in eval mode), and
one batched product per layer gives Σ_b g_b², without a per-example backward pass:

- Linear, (B, d) input:       Σ_b g_b² = (δ²)ᵀ (a²)                          (one matmul)
- Linear, (B, T, d) input:    g_b = δ_bᵀ a_b per example, squared, summed     (einsum over tokens)
- Conv2d (any groups):        g_b = δ_b U_bᵀ with U = unfold(a), per group   (einsum over pixels)

The diagonal true Fisher E_x Σ_c p_c (∂ log p_c/∂W)² then takes one backward pass per class (``exact``: the
square-root-probability trick, loss_c = Σ_b √p_bc log p_bc with p detached, whose per-example gradient squared
is p_bc (∇ log p_bc)²), per kept class (``topk``) or per drawn label (``sampled``) — the same estimators as
:func:`clcompose.strategies.core.fisher.fisher_sum`, which computes them with ``torch.func.vmap`` per example and
stays the reference implementation in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedLayer(TypeError):
    """A targeted layer that the batched formulas do not cover (the caller falls back to per-example vmap)."""


def supported(module: nn.Module) -> bool:
    """Linear layers, and Conv2d layers with zero padding (also TF-style static 'same' padding modules)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        static = getattr(module, "static_padding", None)
        dynamic = type(module).forward is not nn.Conv2d.forward and static is None
        return module.padding_mode == "zeros" and not dynamic and module.padding != "same"
    return False


def _conv_input(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    static = getattr(module, "static_padding", None)  # efficientnet's Conv2dStaticSamePadding pads before conv2d
    return static(a) if static is not None else a


def _sum_of_squares(d: torch.Tensor, u: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ_b (Σ_l d_bl u_blᵀ)², elementwise, for output gradients d (B, O, L) and inputs u (B, I, L) over L positions.

    Two exact routes, whichever moves less memory: per-example gradients g_b = d_b u_bᵀ (B·O·I numbers, in chunks),
    or, when positions are few, the expanded square Σ_b Σ_{l,m} (d_bl ⊙ d_bm)(u_bl ⊙ u_bm)ᵀ as one matmul over
    B·L² rows, which never forms a per-example gradient (L = 1 is the plain (δ²)ᵀ(a²) of a dense layer).
    """
    b, o, positions = d.shape
    i = u.shape[1]
    if positions * positions * (o + i) <= o * i:
        dd = (d.unsqueeze(3) * d.unsqueeze(2)).permute(1, 0, 2, 3).reshape(o, -1)
        uu = (u.unsqueeze(3) * u.unsqueeze(2)).permute(1, 0, 2, 3).reshape(i, -1)
        return dd @ uu.T
    total = d.new_zeros(o, i)
    for s in range(0, b, chunk):
        total += torch.bmm(d[s : s + chunk], u[s : s + chunk].transpose(1, 2)).pow(2).sum(0)
    return total


def _squared_grads(module: nn.Module, a: torch.Tensor, delta: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ_b g_b² of the weight of ``module`` from its inputs ``a`` and output gradients ``delta`` (one batch)."""
    if isinstance(module, nn.Linear):
        if a.dim() == 2:
            return delta.pow(2).T @ a.pow(2)
        a, delta = a.flatten(1, -2), delta.flatten(1, -2)  # (B, T, ·): tokens are the positions
        return _sum_of_squares(delta.transpose(1, 2), a.transpose(1, 2), chunk)
    a = _conv_input(module, a)
    groups, weight = module.groups, module.weight
    out_ch, in_per_group, kh, kw = weight.shape
    u = F.unfold(a, (kh, kw), dilation=module.dilation, padding=module.padding, stride=module.stride)
    b, _, positions = u.shape
    d = delta.reshape(b, out_ch, -1)
    if d.shape[-1] != positions:
        raise UnsupportedLayer(f"{type(module).__name__}: unfolded input does not match its output")
    if groups == 1:
        return _sum_of_squares(d, u, chunk).reshape(weight.shape)
    d = d.reshape(b, groups, out_ch // groups, positions)
    u = u.reshape(b, groups, in_per_group * kh * kw, positions)
    total = a.new_zeros(groups, out_ch // groups, in_per_group * kh * kw)
    for s in range(0, b, chunk):
        total += torch.einsum("bgol,bgil->bgoi", d[s : s + chunk], u[s : s + chunk]).pow(2).sum(0)
    return total.reshape(weight.shape)


class LayerCapture:
    """Forward hooks on ``modules`` (name → Linear/Conv2d) that keep each layer's input (detached) and output
    (with its graph) of a forward run through :meth:`forward`."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        for name, module in modules.items():
            if not supported(module):
                raise UnsupportedLayer(f"{name}: {type(module).__name__} is not a plain Linear/Conv2d layer")
        self.modules = dict(modules)

    def forward(
        self, fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``fn(batch)`` with a graph through the frozen layers (the input requires grad, no weight does), and
        the captures {name: (input, output)} of that forward."""
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def hook(name):
            def keep(module, args, output):
                captured[name] = (args[0].detach(), output)

            return keep

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            with torch.enable_grad():
                out = fn(batch.detach().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        return out, captured


def accumulate_fisher(
    total: dict[str, torch.Tensor],
    modules: Mapping[str, nn.Module],
    logp: torch.Tensor,
    captured: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    mode: str = "exact",
    k: int = 3,
    samples: int = 1,
    chunk: int = 64,
    generator: torch.Generator | None = None,
) -> None:
    """Add one batch's Σ_b Σ_c p_bc (∇_W log p_bc)² (or its top-k / sampled estimate) to ``total`` from the
    log-probabilities ``logp`` (B, C) of a forward whose layer captures are ``captured``; frees its graph."""
    names = list(modules)
    with torch.enable_grad():
        p = logp.detach().exp()
        losses = _losses(logp, p, mode, k, samples, generator)
        outputs = [captured[n][1] for n in names]
        for j, loss in enumerate(losses):
            deltas = torch.autograd.grad(loss, outputs, retain_graph=j < len(losses) - 1)
            for n, delta in zip(names, deltas):
                total[n] += _squared_grads(modules[n], captured[n][0], delta.detach(), chunk)


def zero_fisher(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}


def layer_fisher_sum(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    modules: Mapping[str, nn.Module],
    inputs: Iterable[torch.Tensor],
    mode: str = "exact",
    k: int = 3,
    samples: int = 1,
    chunk: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over examples of Σ_c p_c (∇_W log p_c)² for the weight of every module in ``modules`` (name → module;
    names as the caller keys the result, e.g. ``"net.fc.weight"``), and the example count.

    ``log_prob(x)`` maps a batch (B, ...) to log-probabilities (B, C) of the classes in play, through the
    modules; it must treat examples independently. ``mode``: ``exact`` (all classes), ``topk`` (the ``k`` most
    probable classes per example, weighted by p), ``sampled`` (``samples`` labels per example drawn from p with
    ``generator``, weight 1/samples). ``chunk`` bounds the examples whose per-example gradients are held at once.
    """
    capture = LayerCapture(modules)
    total, count = zero_fisher(capture.modules), 0
    for batch in inputs:
        logp, captured = capture.forward(log_prob, batch)
        accumulate_fisher(total, capture.modules, logp, captured, mode, k, samples, chunk, generator)
        count += int(batch.shape[0])
    return total, count


class RetainedFisherPass:
    """A forward whose Fisher backward passes come later: :meth:`forward` runs the network up to its features
    for a batch and keeps the graph and layer captures; once the head is known, :meth:`fisher_sum` gives the
    same sums as :func:`layer_fisher_sum` with ``log_prob = head ∘ features`` over the same batches, without a
    second forward. Memory: the graph of every kept example (as one training batch of that size)."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.capture = LayerCapture(modules)
        self.batches: list[tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []

    def forward(self, features_fn: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        """``features_fn(batch)``, detached; its graph is kept for :meth:`fisher_sum`."""
        features, captured = self.capture.forward(features_fn, batch)
        self.batches.append((features, captured))
        return features.detach()

    def fisher_sum(
        self,
        head_log_prob: Callable[[torch.Tensor], torch.Tensor],
        mode: str = "exact",
        k: int = 3,
        samples: int = 1,
        chunk: int = 64,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """(Σ over the kept examples of Σ_c p_c (∇_W log p_c)², count), ``head_log_prob`` mapping features to
        log-probabilities; the graphs are released batch by batch."""
        modules = self.capture.modules
        total, count = zero_fisher(modules), 0
        while self.batches:
            features, captured = self.batches.pop(0)
            with torch.enable_grad():
                logp = head_log_prob(features)
            accumulate_fisher(total, modules, logp, captured, mode, k, samples, chunk, generator)
            count += int(features.shape[0])
        return total, count


def _losses(logp: torch.Tensor, p: torch.Tensor, mode: str, k: int, samples: int, generator) -> list[torch.Tensor]:
    """One batch loss per backward pass; each example's gradient in loss j is w_bj ∇ log p(y_bj | x_b) with w_bj²
    its estimator weight (p for exact and top-k, 1/samples for sampled labels)."""
    rows = torch.arange(logp.shape[0], device=logp.device)
    if mode == "exact":
        return [(p[:, c].sqrt() * logp[:, c]).sum() for c in range(logp.shape[1])]
    if mode == "topk":
        top_p, top_i = p.topk(min(k, p.shape[1]), dim=1)
        return [(top_p[:, j].sqrt() * logp[rows, top_i[:, j]]).sum() for j in range(top_i.shape[1])]
    if mode == "sampled":
        labels = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator).to(logp.device)
        weight = (1.0 / samples) ** 0.5
        return [weight * logp[rows, labels[:, j]].sum() for j in range(samples)]
    raise ValueError(f"unknown Fisher mode {mode!r}; valid: exact, topk, sampled")
