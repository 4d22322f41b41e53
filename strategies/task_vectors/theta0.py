"""One θ0 pass per experience for the task-vector strategies' pre-consolidation.

Per experience, before the backbone is tuned, the strategy needs θ0 features f0(x) of the experience's training
data (for the class statistics, the linear probe and, through them, the classifier alignment and the anchor
heads whose softmax the Fisher uses) and the θ0 Fisher Σ_x Σ_c p_c(x) (∇_W log p_c(x))², p = softmax of the
anchor heads on f0(x). The anchor is known only after the probe, so a Fisher with its own forward would run θ0
over the data twice. :func:`theta0_pass` runs it once: when the Fisher sees every example, the forward that
gives the features keeps its graph and layer captures
(:class:`~clcompose.strategies.core.per_example.RetainedFisherPass`), and :func:`theta0_fisher` runs only the
Fisher's backward passes once the anchor exists — the same sums, batch for batch, as a separate Fisher pass.

When the Fisher sees a subsample (``fisher_max_examples`` below the experience's size), uses the vmap backend
or a target the batched formulas do not cover, or the experience has more than :data:`RETAIN_MAX_EXAMPLES`
examples (their graph would be held in memory at once: about 1 MB per example for EfficientNet-Lite0 at 32 px),
the Fisher keeps its own forward of the examples it uses (a forward of ``fisher_max_examples`` examples: 64 by
default). With training augmentation the probe recomputes θ0 features every epoch (the reference's policy):
``probe_epochs − 1`` more θ0 forwards of the experience's data, unchanged here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clcompose.strategies.core.per_example import RetainedFisherPass

RETAIN_MAX_EXAMPLES = 1024
"""The most examples whose θ0 graph one pass keeps for the Fisher (beyond, the Fisher makes its own forward)."""


def retained_fisher_modules(strategy, examples: int) -> dict[str, nn.Module] | None:
    """The targeted Linear/Conv2d modules when the θ0 Fisher of ``strategy`` can reuse the θ0 pass over an
    experience of ``examples`` examples (it is needed, batched, covers every target and every example), else None."""
    opts = strategy.options
    if not strategy._needs_fisher() or opts.fisher_backend != "batched" or examples > RETAIN_MAX_EXAMPLES:
        return None
    if opts.fisher_max_examples is not None and examples > opts.fisher_max_examples:
        return None
    return strategy._fisher_modules()


def theta0_pass(
    strategy, dataset, fisher_modules: dict[str, nn.Module] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RetainedFisherPass | None]:
    """θ0 features, labels and inputs of ``dataset`` in evaluation-sized batches (network in eval mode: BatchNorm
    on running statistics, examples independent), and — with ``fisher_modules`` — the retained pass for
    :func:`theta0_fisher` (None without)."""
    pool = strategy.pool
    base = pool.base_weights()
    retained = RetainedFisherPass(fisher_modules, root=pool.model) if fisher_modules else None
    feats, labels, inputs = [], [], []
    was_training = strategy.model.training
    strategy.model.eval()
    try:
        for batch in strategy.loader(dataset):
            x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
            if retained is not None:
                feats.append(retained.forward(lambda xb: pool.forward_with(base, xb), x))
            else:
                with torch.no_grad():
                    feats.append(pool.forward_with(base, x))
            labels.append(y)
            inputs.append(x)
    finally:
        strategy.model.train(was_training)
    return torch.cat(feats), torch.cat(labels), torch.cat(inputs), retained


def theta0_fisher(strategy, retained: RetainedFisherPass, generator: torch.Generator):
    """(Σ_x Σ_c p_c (∇_W log p_c)², count) at θ0 from the retained pass, p = softmax over every seen class of the
    strategy's anchor heads (as :meth:`~.base.TaskVectorStrategy.backbone_fisher`), estimator and chunk from its
    options."""
    anchor, opts = strategy.anchor, strategy.options
    seen = torch.tensor(anchor.seen_classes, device=strategy.device)
    return retained.fisher_sum(
        lambda f: F.log_softmax(anchor(f)[:, seen], dim=-1),
        **opts.fisher_estimator(),
        generator=generator,
    )
