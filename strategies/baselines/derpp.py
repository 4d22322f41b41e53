"""DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for General Continual Learning") on the suite's heads.

Avalanche's :class:`~avalanche.training.DER` (class-balanced reservoir buffer that stores each example's logits
when its experience ends; one replay mini-batch concatenated to the stream mini-batch), with the loss

    L = CE(z(x), y) + α · mean_{(i, c) ∈ S} (z_c(x'_i) − ẑ_ic)² + β · CE(z(x'), y')

for a stream batch (x, y) and a replay batch (x', y', ẑ) of stored logits ẑ. S holds the columns that had a head
when ẑ was stored. That restriction is the one change to Avalanche's loss: the suite's heads grow per experience
(:class:`~clcompose.strategies.core.heads.ExperienceHeads`), so a stored row is narrower than today's output,
and columns without a head then held the mask value −1e4, which is no target. DER++'s own code has a fixed
output layer over every class, where those columns hold whatever the untrained rows output. The stored
rows are padded to a common width by :func:`pad_logits_collate` and the mask value marks what is not in S.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from avalanche.training import DER
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import cycle

from clcompose.strategies.core.heads import MASK_VALUE
from clcompose.strategies.core.registry import STRATEGIES, Options
from clcompose.strategies.core.training import TrainConfig, template_kwargs


@dataclasses.dataclass
class DERPPOptions(Options):
    """DER++: replay buffer of ``mem_size`` examples with their logits; α weighs logit matching, β replayed CE
    (β = 0 is DER)."""

    alpha: float = 0.1
    beta: float = 0.5
    mem_size: int = 1000
    batch_size_mem: int | None = None  # replay mini-batch size; None: train.batch_size

    def check(self) -> None:
        self.require(self.alpha >= 0, "alpha", "must be >= 0")
        self.require(self.beta >= 0, "beta", "must be >= 0")
        self.require(self.mem_size >= 1, "mem_size", "must be >= 1")
        self.require(self.batch_size_mem is None or self.batch_size_mem >= 1, "batch_size_mem", "must be >= 1")


def stored_columns(stored: torch.Tensor) -> torch.Tensor:
    """Mask of the stored logits that are targets: the columns that had a head when they were stored."""
    return stored > MASK_VALUE / 2


def derpp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    buffer_logits: torch.Tensor,
    buffer_labels: torch.Tensor,
    stored: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """CE(z, y) + α · mean over stored columns of (z' − ẑ)² + β · CE(z', y') (see the module docstring).

    ``stored`` may be narrower than ``buffer_logits``: missing columns are not targets."""
    width = buffer_logits.shape[1]
    if stored.shape[1] < width:
        stored = F.pad(stored, (0, width - stored.shape[1]), value=MASK_VALUE)
    keep = stored_columns(stored[:, :width])
    loss = F.cross_entropy(logits, labels)
    if keep.any():
        loss = loss + alpha * (buffer_logits[keep] - stored[:, :width][keep]).pow(2).mean()
    return loss + beta * F.cross_entropy(buffer_logits, buffer_labels)


def pad_logits_collate(batch: Sequence[tuple]) -> list[torch.Tensor]:
    """Collate buffer items (x, y, task, logits) whose logits have different widths (stored after different
    experiences): pad them to the widest with the mask value."""
    xs, ys, ts, zs = zip(*batch)
    width = max(z.shape[0] for z in zs)
    padded = [F.pad(z, (0, width - z.shape[0]), value=MASK_VALUE) for z in zs]
    as_tensor = [torch.as_tensor(v) for v in ys], [torch.as_tensor(v) for v in ts]
    return [torch.stack(xs), torch.stack(as_tensor[0]), torch.stack(as_tensor[1]), torch.stack(padded)]


class DERPlusPlus(DER):
    """Avalanche's DER/DER++ with the replay loss of :func:`derpp_loss` (stored logits of growing heads)."""

    def _before_training_exp(self, **kwargs):
        buffer = self.storage_policy.buffer
        self.replay_loader = None
        if len(buffer) >= self.batch_size_mem:
            loader = torch.utils.data.DataLoader(
                buffer, batch_size=self.batch_size_mem, shuffle=True, drop_last=True, collate_fn=pad_logits_collate
            )
            self.replay_loader = cycle(loader)
        SupervisedTemplate._before_training_exp(self, **kwargs)

    def training_epoch(self, **kwargs):
        for mbatch in self.dataloader:
            self.mbatch = mbatch
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.optimizer.zero_grad()
            self.loss = self._make_empty_loss()
            self._before_forward(**kwargs)  # DER's: prepends a replay batch (x', y') and keeps ẑ
            self.mb_output = self.forward()
            self._after_forward(**kwargs)
            if self.replay_loader is not None:
                m = self.batch_size_mem
                self.loss += derpp_loss(
                    self.mb_output[m:],
                    self.mb_y[m:],
                    self.mb_output[:m],
                    self.mb_y[:m],
                    self.batch_logits,
                    self.alpha,
                    self.beta,
                )
            else:
                self.loss += self.criterion()
            self._before_backward(**kwargs)
            self.backward()
            self._after_backward(**kwargs)
            self._before_update(**kwargs)
            self.optimizer_step()
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)


@STRATEGIES.register("der++", DERPPOptions)
def derpp(
    model, options: DERPPOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
) -> DERPlusPlus:
    """DER++ (Avalanche's DER): replay of a 1000-example buffer with logit matching (α) and labels (β), full fine-tuning."""
    return DERPlusPlus(
        mem_size=options.mem_size,
        batch_size_mem=options.batch_size_mem,
        alpha=options.alpha,
        beta=options.beta,
        **template_kwargs(model, train, evaluator, device, plugins),
    )
