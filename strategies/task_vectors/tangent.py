"""The linearised network and TMC, tangent model composition (Liu & Soatto, ICCV 2023).

The backbone's first-order Taylor expansion around the pre-trained θ0 in the direction of a task vector τ,

    f_lin(x; τ) = f(x; θ0) + J_θ f(x; θ0) · τ,

is evaluated (:func:`~.composition.linearised_forward`) with one forward-mode pass (:func:`torch.func.jvp`: the primal output and its tangent together).
It is linear in τ, so composing by addition is exact ensembling: f_lin(x; Σ_t c_t τ_t) = Σ_t c_t f_lin(x; τ_t)
whenever Σ_t c_t = 1. TMC trains each τ_t (and its head) through f_lin from θ0, with plain cross-entropy on the
experience's classes, and evaluates f_lin(x; (1/T) Σ_t τ_t) with the concatenated heads (``composition:
tangent``, the default of the ``tmc`` strategy; every other rule can be applied to the tangent vectors too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from torch import nn

from clcompose.strategies.core.registry import STRATEGIES
from clcompose.strategies.core.training import TrainConfig
from clcompose.strategies.task_vectors.base import TaskVectorStrategy
from clcompose.strategies.task_vectors.composition import linearised_forward  # noqa: F401  (public here)
from clcompose.strategies.task_vectors.options import TaskVectorOptions


@dataclasses.dataclass
class TMCOptions(TaskVectorOptions):
    """TMC: independent τ_t trained in the linearised network from θ0, composed by addition in tangent space."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"reference": {"composition": "tangent"}}

    composition: Literal["average", "sum", "ties", "magmax", "fisher", "tangent"] = "tangent"
    merge_fisher: Literal["stored", "task"] = "task"  # no θ0 Fisher is stored without a regulariser
    head_reg_l2: float = 0.0


class TMC(TaskVectorStrategy):
    """Tangent model composition: τ_t and its head trained through f(θ0) + J(θ0)·τ_t, no regulariser;
    evaluated at f(θ0) + J(θ0)·(1/T)Σ τ_t (the average of the linearised components)."""

    method = "tmc"
    train_composition = "tangent"

    def __init__(
        self,
        *,
        model: nn.Module,
        options: TMCOptions | None = None,
        train: TrainConfig | None = None,
        evaluator=None,
        device="cpu",
        plugins: Sequence = (),
    ):
        options = options if options is not None else TMCOptions()
        super().__init__(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)


@STRATEGIES.register("tmc", TMCOptions)
def tmc(model, options: TMCOptions, train: TrainConfig, *, evaluator=None, device="cpu", plugins: Sequence = ()):
    """Tangent model composition: τ_t trained in the linearised network f(θ0) + J·τ_t, composed by addition."""
    return TMC(model=model, options=options, train=train, evaluator=evaluator, device=device, plugins=plugins)
