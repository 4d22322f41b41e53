"""How the task vectors of a :class:`~.composable.ComposableNet` are composed at evaluation (``composition``).

With τ_t the effective weight deltas of the pool (B_t A_t for LoRA, W0 ⊙ (l_t − 1) for IA3) and the rules of
:mod:`.merging`, the evaluated backbone is

- ``average``: θ0 + Σ_t c_t τ_t, c_t = 1/T (or the model's explicit ``coefficients``);
- ``sum``:     θ0 + λ Σ_t τ_t (task arithmetic), λ from ``lambda_grid``;
- ``ties``:    θ0 + λ TIES(τ_1..τ_T; density), λ from ``lambda_grid`` and density from ``ties_density_grid``;
- ``magmax``:  θ0 + λ MagMax(τ_1..τ_T), λ from ``lambda_grid``;
- ``fisher``:  θ0 + Σ_t F_t τ_t / Σ_t F_t with each task's diagonal Fisher F_t (``merge_fisher``: the θ0 Fisher
  the regulariser stores per experience, or the Fisher of θ0 + τ_t with its own head, after its training);
- ``tangent``: the linearised network f(θ0) + J(θ0)·Σ_t c_t τ_t (:func:`linearised_forward`), c_t = 1/T.

The composed parameters (and the tangent direction) are materialised once per evaluation and cached by the
model until its task vectors change, so a composed forward costs a plain forward (``tangent``: one ``jvp``).
λ and the density are chosen by :class:`LambdaSelection` on ``val_fraction`` of every training experience held
out of training (never the test stream); the rules without a hyperparameter hold nothing out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch.func import jvp

from clcompose.strategies.core.fisher import fisher_sum
from clcompose.strategies.core.registry import ConfigError
from clcompose.strategies.task_vectors import merging

SELECTED = ("sum", "ties", "magmax")  # the rules with a hyperparameter chosen on held-out data
WEIGHTED = ("average", "sum", "tangent")  # θ0 + Σ_t c_t τ_t (tangent: in the linearised network)


def linearised_forward(pool, base: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], *args):
    """f(θ0) + J(θ0)·δ of ``pool``'s network on ``args`` by one :func:`torch.func.jvp`: ``base`` the targeted
    weights θ0, ``direction`` δ per weight (differentiable w.r.t. δ, e.g. a LoRA delta B A in training)."""
    names = list(base)
    primal = tuple(base[n].detach() for n in names)
    tangent = tuple(direction[n] for n in names)

    def f(*weights):
        return pool.forward_with(dict(zip(names, weights)), *args)

    # fused attention kernels (timm's ViT calls scaled_dot_product_attention) have no forward-mode derivative;
    # the math kernel computes the same attention and has one
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out, jvp_out = jvp(f, primal, tangent)
    return out + jvp_out


def task_vectors(pool) -> list[dict[str, torch.Tensor]]:
    """The effective deltas τ_t of every task of the pool, detached."""
    with torch.no_grad():
        return [{n: d.detach() for n, d in pool.deltas(t).items()} for t in range(pool.num_tasks)]


@dataclasses.dataclass
class Composition:
    """A composition rule with its chosen hyperparameters (``scale`` λ, ``density``) and, for ``fisher``, the
    per-task diagonal Fishers ``fishers[t]`` (name → F_t)."""

    rule: str = "average"
    scale: float = 1.0
    density: float = 0.2
    fishers: list[dict[str, torch.Tensor]] = dataclasses.field(default_factory=list)
    _merged: dict = dataclasses.field(default_factory=dict, repr=False)  # (rule, density, T) → unscaled τ_m

    def clear(self) -> None:
        """Forget the merged deltas (the task vectors changed)."""
        self._merged = {}

    def merged_delta(self, pool) -> dict[str, torch.Tensor]:
        """τ_m of a non-weighted rule (ties, magmax, fisher), λ applied; cached per rule, density and T."""
        key = (self.rule, self.density, pool.num_tasks)
        if key not in self._merged:
            vectors = task_vectors(pool)
            if self.rule == "ties":
                merged = merging.ties_merge(vectors, self.density)
            elif self.rule == "magmax":
                merged = merging.magmax_merge(vectors)
            elif self.rule == "fisher":
                if len(self.fishers) < len(vectors):
                    raise RuntimeError(f"fisher merging needs {len(vectors)} Fishers, has {len(self.fishers)}")
                merged = merging.fisher_merge(vectors, self.fishers[: len(vectors)])
            else:
                raise ValueError(f"{self.rule!r} is a weighted rule: it has no merged delta")
            self._merged = {key: merged}
        scale = self.scale if self.rule in ("ties", "magmax") else 1.0
        return {n: scale * d for n, d in self._merged[key].items()} if scale != 1.0 else dict(self._merged[key])

    @torch.no_grad()
    def weights(self, pool, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        """The evaluated targeted weights: θ0 + Σ c_t τ_t (average, sum), θ0 + τ_m, or θ0 itself (``tangent``,
        whose displacement is :meth:`direction`)."""
        if self.rule in ("average", "sum"):
            return pool.weights(coefficients)
        base = pool.base_weights()
        if self.rule == "tangent":
            return dict(base)
        merged = self.merged_delta(pool)
        return {n: base[n] + merged[n] for n in pool.names}

    @torch.no_grad()
    def direction(self, pool, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        """The tangent direction Σ_t c_t τ_t of ``tangent``."""
        return pool.delta_sum(coefficients, detach=True)

    def weighted(self) -> bool:
        """Whether the composed point is θ0 + Σ_t c_t τ_t with scalar c_t (the Jensen identity applies)."""
        return self.rule in WEIGHTED


def stored_fisher(fisher, t: int) -> dict[str, torch.Tensor]:
    """Experience t's own θ0 Fisher from the accumulator's sums: ε + U_t / n_t."""
    return {n: fisher.eps + s / fisher.counts[t] for n, s in fisher.sums[t].items()}


def task_fisher(strategy, t: int, dataset) -> dict[str, torch.Tensor]:
    """Diagonal true Fisher of task t's own model θ0 + τ_t with its head (softmax over its classes), on at most
    ``fisher_max_examples`` of its training examples, with the run's estimator (``fisher``): F_t + ε."""
    opts, pool, model = strategy.options, strategy.pool, strategy.model
    gen = strategy._rng()
    base, deltas = pool.base_weights(), pool.deltas(t)
    weights = {n: (base[n] + deltas[n]).detach() for n in pool.names}
    classes = torch.tensor(model.heads.head_classes[t], device=strategy.device)
    inputs = torch.cat([b[0] for b in strategy.loader(dataset)]).to(strategy.device)
    if opts.fisher_max_examples is not None and len(inputs) > opts.fisher_max_examples:
        inputs = inputs[torch.randperm(len(inputs), generator=gen)[: opts.fisher_max_examples]]
    heads = model.heads

    def log_prob(w, x):
        return F.log_softmax(heads(pool.forward_with(w, x.unsqueeze(0)))[0, classes], dim=-1)

    was_training = model.training
    model.eval()
    try:
        sums, count = fisher_sum(
            log_prob,
            weights,
            torch.split(inputs, strategy.train_config.eval_batch_size),
            **opts.fisher_estimator(),
            generator=gen,
        )
    finally:
        model.train(was_training)
    return {n: opts.eps + s / count for n, s in sums.items()}


class MergeFishers(SupervisedPlugin):
    """After each training experience, appends that task's Fisher to the model's composition (``fisher``)."""

    def __init__(self, source: str):
        super().__init__()
        self.source = source

    def after_training_exp(self, strategy, *args, **kwargs):
        t = strategy.pool.num_tasks - 1
        comp = strategy.model.composition
        if self.source == "stored":
            comp.fishers.append(stored_fisher(strategy.fisher, t))
        else:
            comp.fishers.append(task_fisher(strategy, t, strategy.adapted_dataset))
        comp.clear()
        strategy.model.invalidate()


class LambdaSelection(SupervisedPlugin):
    """Holds out ``val_fraction`` of every training experience and, after each, sets the composition's
    hyperparameters to the candidate with the best accuracy on the held-out data of all experiences seen so far
    (ties: the first candidate). Candidates: λ of ``grid`` (``sum``: θ0 + λ Σ_t τ_t through the coefficients;
    ``magmax``), or every (density, λ) of ``densities`` × ``grid`` (``ties``)."""

    def __init__(self, grid: Sequence[float], val_fraction: float, densities: Sequence[float] | None = None):
        super().__init__()
        self.grid, self.val_fraction = list(grid), val_fraction
        self.densities = list(densities) if densities is not None else None
        self.val_sets: list = []
        self.rows: list[dict] = []

    def after_train_dataset_adaptation(self, strategy, *args, **kwargs):
        n = len(strategy.adapted_dataset)
        n_val = max(1, int(round(n * self.val_fraction)))
        perm = torch.randperm(n).tolist()
        self.val_sets.append(strategy.adapted_dataset.subset(perm[:n_val]))
        strategy.adapted_dataset = strategy.adapted_dataset.subset(perm[n_val:])

    @staticmethod
    def apply(model, lam: float, density: float | None) -> None:
        comp = getattr(model, "composition", None)
        if comp is None or comp.rule == "sum":
            model.coefficients = [lam] * model.pool.num_tasks
        else:
            comp.scale = lam
            if density is not None:
                comp.density = density
        model.invalidate()

    @torch.no_grad()
    def after_training_exp(self, strategy, *args, **kwargs):
        model, device = strategy.model, strategy.device
        data = [(x.to(device), y.to(device)) for ds in self.val_sets for x, y, *_ in strategy.loader(ds)]
        was_training = model.training
        model.eval()
        best, best_acc = None, -1.0
        for density in self.densities if self.densities is not None else [None]:
            for lam in self.grid:
                self.apply(model, lam, density)
                correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
                acc = correct / max(1, sum(len(y) for _, y in data))
                if acc > best_acc:
                    best, best_acc = (lam, density), acc
        model.train(was_training)
        self.apply(model, *best)
        n_val = sum(len(y) for _, y in data)
        row = {"experience": model.pool.num_tasks - 1, "lambda": best[0]}
        row |= {"density": best[1]} if best[1] is not None else {}
        self.rows.append(row | {"val_accuracy": best_acc, "val_examples": n_val})


def composition_plugins(options, strength: float) -> list[SupervisedPlugin]:
    """The plugins a task-vector strategy needs for ``options.composition``: the λ/density selection or the
    Fishers of ``fisher`` (``merge_fisher=stored`` needs a regulariser, i.e. ``strength`` > 0)."""
    rule = options.composition
    if rule in SELECTED:
        return [
            LambdaSelection(
                options.lambda_grid, options.val_fraction, options.ties_density_grid if rule == "ties" else None
            )
        ]
    if rule == "fisher":
        if options.merge_fisher == "stored" and strength <= 0:
            raise ConfigError(
                "composition=fisher with merge_fisher=stored needs the θ0 Fisher of a regulariser (alpha/beta > 0); "
                "use merge_fisher=task"
            )
        return [MergeFishers(options.merge_fisher)]
    return []
