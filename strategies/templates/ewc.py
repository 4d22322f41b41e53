"""EWC on the shared body of a template network: (λ/2) Σ_s F_s (θ − θ*_s)², one anchor θ*_s and diagonal true
Fisher F_s per past task, applied as a proximal step after each optimiser step or as a gradient penalty.

The maths is in plain functions (:func:`ewc_penalty`, :func:`ewc_proximal`, :func:`proximal_step_size`); the
Avalanche plugin :class:`SharedEWCPlugin` holds the anchors and Fishers and applies them to a task-aware
template strategy (:class:`~clcompose.strategies.templates.task_aware.TemplateEWC`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch.func import functional_call

from clcompose.strategies.core.fisher import fisher_sum
from clcompose.strategies.templates.network import TemplateMixtureNet
from clcompose.strategies.templates.options import TemplateEWCOptions
from clcompose.strategies.templates.programs import experience_tasks, sample_examples, task_data


def ewc_proximal(
    theta: torch.Tensor,
    anchors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    lam: float,
    lr: float | torch.Tensor,
) -> torch.Tensor:
    """argmin_θ (1/2η)‖θ − θ'‖² + (λ/2) Σ_s F_s (θ − θ*_s)²  =  (θ' + ηλ Σ_s F_s θ*_s) / (1 + ηλ Σ_s F_s), elementwise
    (η a number or a per-coordinate tensor)."""
    weight = sum(fishers) * (lr * lam)
    pull = sum(f * a for f, a in zip(fishers, anchors, strict=True)) * (lr * lam)
    return (theta + pull) / (1 + weight)


def proximal_step_size(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor | float:
    """The step η that the optimiser's last update applied to a gradient of ``p`` at steady state, so that the
    proximal EWC step balances the penalty against the loss at the EWC optimum: SGD lr / (1 − momentum) (momentum
    accumulates the gradient to g / (1 − μ)), Adam/AdamW lr / (√v̂ + ε) per coordinate; anything else lr."""
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            break
    else:
        raise KeyError("parameter not in the optimiser")
    lr = group["lr"]
    if isinstance(optimizer, torch.optim.SGD):
        momentum = group.get("momentum", 0.0)
        return lr / (1.0 - momentum) if 0 < momentum < 1 else lr
    state = optimizer.state.get(p, {})
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg_sq" in state:
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** step)
        return lr / (v_hat.sqrt() + group["eps"])
    return lr


def ewc_penalty(
    params: dict[str, torch.Tensor], anchors: Sequence[dict], fishers: Sequence[dict], lam: float
) -> torch.Tensor:
    """(λ/2) Σ_s Σ_i F_s,i (θ_i − θ*_s,i)²."""
    total = torch.zeros(())
    for anchor, fisher in zip(anchors, fishers, strict=True):
        for n, p in params.items():
            total = total + (fisher[n] * (p - anchor[n]).pow(2)).sum()
    return 0.5 * lam * total


class SharedEWCPlugin(SupervisedPlugin):
    """EWC on the shared parameters of a task-aware template strategy (one with a ``TaskProgramNet`` model and
    a ``body()`` view): the template bank (``scope="bank"``) or the whole body (``"shared"``).

    After each experience it stores, per task of the experience, the anchor θ*_t and the diagonal true Fisher
    F_t; later experiences apply (λ/2) Σ_s F_s (θ − θ*_s)² either as a proximal step right after each optimiser
    step (``step="proximal"``) or as a term of the loss (``"gradient"``). Its state is plain tensors in lists,
    so it is checkpointed with the strategy. Put it first in the strategy's plugins: the proximal step then
    directly follows the optimiser step, and the anchors exist before any later plugin sees the experience end.
    """

    def __init__(
        self,
        ewc_lambda: float = 100.0,
        scope: Literal["bank", "shared"] = "bank",
        step: Literal["proximal", "gradient"] = "proximal",
        fisher: Literal["exact", "topk", "sampled"] = "exact",
        max_examples: int = 128,
    ):
        super().__init__()
        self.ewc_lambda, self.scope, self.step = ewc_lambda, scope, step
        self.fisher_mode, self.max_examples = fisher, max_examples
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.fishers: list[dict[str, torch.Tensor]] = []

    @classmethod
    def from_options(cls, options: TemplateEWCOptions) -> SharedEWCPlugin:
        """The plugin configured by template EWC's options."""
        return cls(options.ewc_lambda, options.scope, options.step, options.fisher, options.fisher_max_examples)

    def names(self, body: TemplateMixtureNet) -> list[str]:
        """The penalised parameters of ``body``, by name."""
        return [n for n, _ in body.named_parameters() if self.scope == "shared" or n.startswith("bank.")]

    def _active(self) -> bool:
        return bool(self.anchors) and self.ewc_lambda > 0

    # ------------------------------------------------------------------ callbacks
    def before_backward(self, strategy, **kwargs):
        # the loss starts at 0 and holds the cross-entropy: adding here gives the same sum as CE + penalty
        if self.step == "gradient" and self._active():
            body = strategy.body()
            params = dict(body.named_parameters())
            strategy.loss += ewc_penalty(
                {n: params[n] for n in self.names(body)}, self.anchors, self.fishers, self.ewc_lambda
            )

    def after_update(self, strategy, **kwargs):
        if self.step == "proximal" and self._active():
            body = strategy.body()
            params = dict(body.named_parameters())
            with torch.no_grad():
                for n in self.names(body):
                    p = params[n]
                    step = proximal_step_size(strategy.optimizer, p)
                    p.copy_(
                        ewc_proximal(
                            p, [a[n] for a in self.anchors], [f[n] for f in self.fishers], self.ewc_lambda, step
                        )
                    )

    def after_training_exp(self, strategy, **kwargs):
        for t in experience_tasks(strategy.experience):
            anchor, fisher = self.anchor_and_fisher(strategy, t)
            self.anchors.append(anchor)
            self.fishers.append(fisher)

    # ------------------------------------------------------------------ the Fisher
    def anchor_and_fisher(self, strategy, task: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """θ*_t and the diagonal true Fisher of the EWC parameters, on up to ``max_examples`` of task t's
        training examples (the network in eval mode: the task's running statistics). The examples are drawn
        from the global random generator."""
        x, _ = sample_examples(task_data(strategy.adapted_dataset, task), self.max_examples, strategy.device)
        body, net = strategy.body(), strategy.model
        names = self.names(body)
        params = dict(body.named_parameters())
        mixture, norms, head = net.mixture(task).detach(), net.norms[str(task)], net.heads[str(task)]
        was_training = net.training
        net.eval()

        def log_prob(weights, xi):
            feats = functional_call(body, weights, (xi.unsqueeze(0), mixture, norms), strict=False)
            return F.log_softmax(head(feats)[0], dim=-1)

        with torch.no_grad():  # the head is captured by the closure: keep the Fisher out of the autograd graph
            sums, count = fisher_sum(log_prob, {n: params[n] for n in names}, [x], mode=self.fisher_mode, chunk=32)
        net.train(was_training)
        return {n: params[n].detach().clone() for n in names}, {n: (s / count).detach() for n, s in sums.items()}
