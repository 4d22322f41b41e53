"""The θ0 linear probe: ITA/IEL's head procedure with no backbone tuning at all (a control).

Per experience: the class statistics of θ0 features, a linear probe of the new head on frozen θ0 features and
classifier alignment of all heads on those statistics — exactly the pre-consolidation ITA and IEL run
(:mod:`.consolidation`), the anchor heads becoming the heads used at inference — and no training epoch, so
the model stays θ0. It is the floor any backbone tuning must beat: what a leaderboard row of ITA or IEL owes
to its task vectors and regulariser is its distance above this row at the same head settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.options import TaskVectorOptions


@dataclasses.dataclass
class LinearProbeOptions(TaskVectorOptions):
    """The head options of ITA/IEL (probe, alignment, class statistics); the tuning options are unused."""

    diagnostics: bool = False  # no task vector to diagnose


class LinearProbe(TaskVectorStrategy):
    """Heads from θ0 features only: probe + classifier alignment per experience, the backbone never trained."""

    method = "probe"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: LinearProbeOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else LinearProbeOptions()
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
        self.train_epochs = 0  # the heads come from pre-consolidation; nothing is trained by gradient descent

    def _needs_anchor(self) -> bool:
        return True


@STRATEGIES.register("linear-probe", LinearProbeOptions)
def linear_probe(
    model, options: LinearProbeOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()
):
    """θ0 linear probe with ITA/IEL's classifier alignment and no backbone tuning (a control row)."""
    return LinearProbe(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
