"""The diagonal Fisher of Linear and Conv2d weights, per example, at the cost of batched backward passes.

Forward hooks keep each targeted layer's input a and output (:class:`LayerCapture`); ``torch.autograd.grad`` of a
*batch* loss with respect to those outputs gives every example's output gradient δ at once (examples do not
interact: BatchNorm in eval mode), and :class:`~clcompose.strategies.core.layer_squares.LayerSquares` turns a
and δ into Σ_b g_b² of the per-example weight gradients g_b = Σ_positions δ aᵀ without a per-example backward.

The diagonal true Fisher E_x Σ_c p_c (∂ log p_c/∂W)² then takes C − 1 backward passes for C classes
(``exact``: a rank-(C − 1) factorisation of diag p − p pᵀ, :func:`output_vectors`), one per kept class
(``topk``) or per drawn label (``sampled``) — the same estimators as
:func:`clcompose.strategies.core.fisher.fisher_sum`, which computes them with ``torch.func.vmap`` per example and
stays the reference implementation in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from clcompose.strategies.core.layer_squares import LayerSquares, Scratch, UnsupportedLayer, supported

__all__ = [
    "LayerCapture",
    "LayerSquares",
    "RetainedFisherPass",
    "UnsupportedLayer",
    "accumulate_fisher",
    "layer_fisher_sum",
    "output_vectors",
    "supported",
    "zero_fisher",
]


def _affine_batchnorm(module: nn.modules.batchnorm._BatchNorm, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: an eval-mode BatchNorm's output as its affine map x·s + t, s = γ/√(σ² + ε), t = β − μ s. The
    same function (to rounding, about 1e-6 relative), whose input gradient costs one multiply instead of
    ``native_batch_norm_backward`` (2–3× cheaper per layer, measured on EfficientNet-Lite0's)."""
    x = args[0]
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    view = (1, -1) + (1,) * (x.dim() - 2)  # the output in the input's dtype, as batch_norm's
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))


def _padded_channels_last(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a convolution's static padding (``static_padding``, TF-style 'same'): the padded input in
    channels-last layout when its input had it. At one spatial position an input is in both layouts at once and
    ``F.pad`` returns it channels-first, so the (depthwise) convolution after it, and its backward, ran the
    channels-first CPU kernels: 3–4× slower at 1 × 1 inputs (EfficientNet-Lite0's last stage at 32 px; the
    Fisher's backward passes about 20 % faster with this hook, measured side by side). The values are the same;
    only their order in memory differs."""
    x = args[0]
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return output.contiguous(memory_format=torch.channels_last)
    return None


def _static_paddings(modules: Iterable[nn.Module]) -> list[nn.Module]:
    return [p for m in modules if isinstance(p := getattr(m, "static_padding", None), nn.Module)]


def _frozen_batchnorms(root: nn.Module | None) -> list[nn.Module]:
    """The BatchNorm layers of ``root`` that normalise with their running statistics (eval mode)."""
    if root is None:
        return []
    return [
        m
        for m in root.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_mean is not None
    ]


class LayerCapture:
    """Forward hooks on ``modules`` (name → Linear/Conv2d) that keep each layer's input (detached) and output
    (with its graph) of a forward run through :meth:`forward`. With ``root`` (the network the modules belong
    to), its eval-mode BatchNorm layers run as their affine map during that forward (:func:`_affine_batchnorm`):
    the Fisher's backward passes then skip BatchNorm's general backward. Static paddings of the modules keep a
    channels-last input's layout (:func:`_padded_channels_last`)."""

    def __init__(self, modules: Mapping[str, nn.Module], root: nn.Module | None = None):
        for name, module in modules.items():
            if not supported(module):
                raise UnsupportedLayer(f"{name}: {type(module).__name__} is not a plain Linear/Conv2d layer")
        self.modules = dict(modules)
        self.root = root

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
        handles += [m.register_forward_hook(_affine_batchnorm) for m in _frozen_batchnorms(self.root)]
        handles += [p.register_forward_hook(_padded_channels_last) for p in _static_paddings(self.modules.values())]
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
        vectors = output_vectors(logp.detach(), mode, k, samples, generator)
        scratch = Scratch()  # one buffer for every layer's per-example gradients: formed one layer at a time
        squares = {n: LayerSquares(modules[n], captured[n][0], len(vectors), chunk, scratch=scratch) for n in names}
        outputs = [captured[n][1] for n in names]
        for j, v in enumerate(vectors):
            deltas = torch.autograd.grad(logp, outputs, grad_outputs=v, retain_graph=j < len(vectors) - 1)
            for n, delta in zip(names, deltas):
                squares[n].add(delta.detach())
        for n in names:
            total[n] += squares[n].total()


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
    root: nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over examples of Σ_c p_c (∇_W log p_c)² for the weight of every module in ``modules`` (name → module;
    names as the caller keys the result, e.g. ``"net.fc.weight"``), and the example count.

    ``log_prob(x)`` maps a batch (B, ...) to log-probabilities (B, C) of the classes in play, through the
    modules; it must treat examples independently. ``mode``: ``exact`` (all classes), ``topk`` (the ``k`` most
    probable classes per example, weighted by p), ``sampled`` (``samples`` labels per example drawn from p with
    ``generator``, weight 1/samples). ``chunk`` bounds the examples whose per-example gradients are held at once.
    ``root``: the network the modules belong to, whose eval-mode BatchNorm layers then run as affine maps
    (:class:`LayerCapture`).
    """
    capture = LayerCapture(modules, root)
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

    def __init__(self, modules: Mapping[str, nn.Module], root: nn.Module | None = None):
        self.capture = LayerCapture(modules, root)
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


def output_vectors(
    logp: torch.Tensor, mode: str, k: int = 3, samples: int = 1, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """The vectors v_j (B, C) on the log-probabilities, one per backward pass, whose per-example gradients
    g_bj = J_bᵀ v_bj satisfy Σ_j g_bj² = the estimator's Σ_c w_bc (∇ log p_bc)² (J_b: Jacobian of log p_b).

    - ``exact``: with z the logits, ∇ log p_c = J_zᵀ (e_c − p), so Σ_c p_c (∇ log p_c)² is the diagonal of
      J_zᵀ (diag p − p pᵀ) J_z. That matrix has rank C − 1 (its null vector is 1), so C − 1 vectors
      v_j = √λ_j q_j of its eigendecomposition (λ, q per example, the zero eigenvalue dropped) give it exactly: one
      backward pass fewer than one per class. As 1ᵀ v_j = 0, the log-softmax passes v_j to the logits unchanged.
    - ``topk``: √p_bc on the k most probable classes c; ``sampled``: 1/√samples on each drawn label.
    """
    p = logp.exp()
    batch, classes = p.shape
    rows = torch.arange(batch, device=p.device)
    if mode == "exact":
        p64 = p.double()
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.diag_embed(p64) - p64.unsqueeze(2) * p64.unsqueeze(1))
        scaled = eigenvectors * eigenvalues.clamp_min(0).sqrt().unsqueeze(1)  # column j: √λ_j q_j
        return [scaled[:, :, j].to(p.dtype) for j in range(1, classes)]  # eigh sorts ascending: drop λ_0 = 0

    def one_hot(columns: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(p)
        v[rows, columns] = weights
        return v

    if mode == "topk":
        top_p, top_i = p.topk(min(k, classes), dim=1)
        return [one_hot(top_i[:, j], top_p[:, j].sqrt()) for j in range(top_i.shape[1])]
    if mode == "sampled":
        labels = torch.multinomial(p.cpu(), samples, replacement=True, generator=generator).to(p.device)
        return [one_hot(labels[:, j], torch.full((batch,), samples**-0.5, device=p.device)) for j in range(samples)]
    raise ValueError(f"unknown Fisher mode {mode!r}; valid: exact, topk, sampled")
