"""Few-shot probes of the hypernetwork-teacher streams: what a trained strategy knows about held-out tasks.

Every learner is scored by the same protocol: a few-shot learner (:class:`~clcompose.strategies.core.protocols.FewShotLearner`,
the meta-learners) adapts its fast parameters on each task's support set; any other strategy gets a linear
read-out fitted on its features (the composed network for task-vector strategies,
:class:`~clcompose.strategies.core.protocols.ComposesTaskVectors`). Metric definitions are the pure functions of
:mod:`clcompose.strategies.metrics.compositional`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from clcompose.strategies.core.protocols import ComposesTaskVectors, FewShotLearner
from clcompose.strategies.meta.learner import adapt
from clcompose.strategies.meta.tasks import Combination, TaskSet
from clcompose.strategies.metrics import compositional as C

if TYPE_CHECKING:
    from clcompose.bench.data.teacher_streams import TeacherStreams


def _probe_head(features_s, soft_s, features_t, steps: int, lr: float):
    """Few-shot read-out (monolithic protocol): a linear head from zero, AdamW on the support KL, vmapped."""

    class _Head(torch.nn.Module):
        def forward(self, fast, f):
            return f @ fast["w"] + fast["b"]

    head = _Head()
    d, o = features_s.shape[-1], soft_s.shape[-1]
    init = {"w": torch.zeros(d, o), "b": torch.zeros(o)}
    fast = torch.func.vmap(lambda f, s: adapt(head, init, f, s, steps, lr, 1e-4, False))(features_s, soft_s)
    logits = torch.func.vmap(head.forward)(fast, features_t)
    return logits, torch.cat([fast["w"].flatten(1), fast["b"]], 1)


def _untrained_features(strategy):
    """Features of the same architecture before any training: θ0 for task-vector networks (their frozen base),
    otherwise a copy re-initialised with a fixed seed (the global RNG is left as it was)."""
    import copy

    if isinstance(strategy, ComposesTaskVectors):
        return strategy.features_at(None)
    fresh = copy.deepcopy(strategy.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for m in fresh.modules():
            if m is not fresh and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    fresh.eval()
    return getattr(fresh, "features", None) or fresh


def _plain_adapt(data: TeacherStreams, strategy, tasks: TaskSet, initial: bool = False):
    """Accuracy and read-out parameters of a strategy without fast parameters: its network's features (the
    composed network for task-vector strategies; ``initial``: the untrained network), a linear read-out adapted
    on each support set."""
    model = strategy.model
    model.eval()
    features = _untrained_features(strategy) if initial else getattr(model, "features", None) or model

    def feats(x):
        with torch.no_grad():
            flat = data.inputs(tasks, x).reshape(-1, data.input_dim).to(strategy.device)
            return features(flat).reshape(len(tasks), x.shape[1], -1).cpu()

    (sx, ss, _), (tx, ts, _) = tasks.support(), tasks.test()
    o = data.options
    logits, fast = _probe_head(feats(sx), ss, feats(tx), o.probe_steps, o.probe_lr)
    per_task = (logits.argmax(-1) == ts.argmax(-1)).float().mean(1)
    loss = float(torch.stack([_kl(logits[i], ts[i]) for i in range(len(tasks))]).mean())
    return float(per_task.mean()), loss, fast


def _kl(logits, soft):
    return C.soft_kl(logits, soft)


def _few_shot(data: TeacherStreams, strategy, tasks: TaskSet, initial: bool = False):
    """(accuracy, loss, adapted task parameters) of the few-shot protocol: a meta-learner adapts its fast
    parameters, any other strategy fits a read-out on its features (``initial``: from the untrained learner)."""
    if isinstance(strategy, FewShotLearner):
        r = strategy.adapt_tasks(tasks, initial=initial)
        return r.accuracy, r.loss, r.fast
    return _plain_adapt(data, strategy, tasks, initial=initial)


def _modules(c: Combination) -> set[int]:
    """Every module a combination uses, in any generated layer."""
    return {m for code in c for m in code}


def teacher_metrics(data: TeacherStreams, strategy) -> dict[str, float | None]:
    """Few-shot metrics after the stream, for any strategy (adapting its fast parameters if it has some, else a
    read-out on its features): ``id_accuracy``/``id_loss`` on the trained tasks, ``ood_accuracy``/``ood_loss`` on
    the held-out combinations, ``comp_gap`` = id − ood, ``noncomp_accuracy`` (noncomp stream), the
    ``*_noinfo_accuracy`` of the same adaptation from the untrained learner (the no-information level),
    ``decode_r2`` (ridge from adapted fast parameters to z, fitted on trained tasks, scored on OOD tasks), and on
    the one-module stream ``composition_gain`` (meta-learners: merged codes; task-vector strategies: merged task
    vectors)."""
    trained = TaskSet.concat(data.experiences)
    out: dict[str, float | None] = {}

    def run(tasks: TaskSet, initial: bool = False):  # the few-shot protocol of this strategy
        return _few_shot(data, strategy, tasks, initial)

    id_acc, id_loss, id_fast = run(trained)
    out |= {"id_accuracy": id_acc, "id_loss": id_loss}
    ood = data.probes.get("ood")
    if ood is not None:
        ood_acc, ood_loss, ood_fast = run(ood)
        out |= {"ood_accuracy": ood_acc, "ood_loss": ood_loss, "comp_gap": C.compositional_gap(id_acc, ood_acc)}
        fit_z, test_z = trained.z.flatten(1).numpy(), ood.z.flatten(1).numpy()
        r2 = C.decoding_r2(id_fast.numpy(), fit_z, ood_fast.numpy(), test_z) if len(trained) > 2 else math.nan
        out["decode_r2"] = None if math.isnan(r2) else r2
        out["ood_noinfo_accuracy"] = run(ood, initial=True)[0]
    noncomp = data.probes.get("noncomp")
    if noncomp is not None:
        out["noncomp_accuracy"] = run(noncomp)[0]
        out["noncomp_noinfo_accuracy"] = run(noncomp, initial=True)[0]
    out["id_noinfo_accuracy"] = run(trained, initial=True)[0]
    if ood is not None and all(len(c[0]) == 1 for t in data.experiences for c in t.combinations):
        gain = composition_gain(data, strategy, trained, ood)
        if gain is not None:
            out["composition_gain"] = gain
    return out


def probe_accuracies(data: TeacherStreams, strategy, trained: Sequence[int]) -> dict[str, float]:
    """Few-shot accuracy on every probe stream (``<probe>_accuracy``) with the strategy as it is after training
    the experiences ``trained``: the benchmark's ``step_metrics``. While some modules are still unseen, each probe
    is also split into its combinations of seen modules only (``<probe>_seen_accuracy``: CompGen(e) of the
    connected curriculum) and those using an unseen module (``<probe>_unseen_accuracy``: NonComp(e))."""

    def accuracy(tasks: TaskSet) -> float:
        return _few_shot(data, strategy, tasks)[0]

    seen = {m for e in trained for c in data.experiences[e].combinations for m in _modules(c)}
    out = {}
    for name, tasks in data.probes.items():
        out[f"{name}_accuracy"] = accuracy(tasks)
        inside = [i for i in range(len(tasks)) if _modules(tasks.combinations[int(tasks.combination[i])]) <= seen]
        if 0 < len(inside) < len(tasks):
            outside = sorted(set(range(len(tasks))) - set(inside))
            out[f"{name}_seen_accuracy"] = accuracy(tasks.subset(inside))
            out[f"{name}_unseen_accuracy"] = accuracy(tasks.subset(outside))
    return out


def composition_gain(data: TeacherStreams, strategy, trained: TaskSet, pairs: TaskSet) -> float | None:
    """Composition gain on the one-module stream, zero-shot on each pair {a, b} (test points):
    acc(merged) − max(acc(a alone), acc(b alone)), averaged over pairs (2-module combinations only).

    Meta-learners: fast parameters φ_a, φ_b adapted on the single-module tasks, merged as
    φ0 + λ((φ_a − φ0) + (φ_b − φ0)); task-vector strategies (:class:`~clcompose.strategies.core.protocols.ComposesTaskVectors`):
    θ0 + λ(τ_a + τ_b) with the read-out fitted few-shot on the pair. λ ∈ {0.5, 1} chosen on the first pair.
    Other strategies: None.
    """
    pair_idx = [i for i, c in enumerate(pairs.combinations) if len(c[0]) == 2]
    if not pair_idx:
        return None
    if isinstance(strategy, FewShotLearner):
        single = {}  # module → mean adapted fast parameters over its tasks
        for m in range(data.options.n_modules):
            idx = [i for i in range(len(trained)) if trained.combinations[int(trained.combination[i])][0] == (m,)]
            single[m] = strategy.mean_adapted(trained.subset(idx))
        init = strategy.initial_fast()

        def acc(fast, tasks):
            (tx, ts, _) = tasks.test()
            logits = strategy.predict_with(fast, tx.reshape(-1, tx.shape[-1])).cpu()
            return C.agreement_accuracy(logits, ts.reshape(-1, ts.shape[-1]))

        def merged(a, b, lam):
            return {k: init[k] + lam * (single[a][k] - init[k] + single[b][k] - init[k]) for k in init}
    elif isinstance(strategy, ComposesTaskVectors):
        return _task_vector_gain(data, strategy, pairs, pair_idx)
    else:
        return None
    combos = [pairs.combinations[i][0] for i in pair_idx]
    by_combo = {
        c: pairs.subset([j for j in range(len(pairs)) if int(pairs.combination[j]) == i])
        for i, c in zip(pair_idx, combos)
    }
    first = combos[0]
    lam = max((0.5, 1.0), key=lambda lam_: acc(merged(*first, lam_), by_combo[first]))
    rest = combos[1:] or combos
    merged_acc = [acc(merged(a, b, lam), by_combo[(a, b)]) for a, b in rest]
    singles = [[acc(single[a], by_combo[(a, b)]), acc(single[b], by_combo[(a, b)])] for a, b in rest]
    return C.composition_gain(merged_acc, singles)


def _task_vector_gain(data: TeacherStreams, strategy, pairs: TaskSet, pair_idx: list[int]) -> float | None:
    """Merged task vectors θ0 + λ(τ_a + τ_b) vs single ones, read-out fitted few-shot on each pair's support."""
    n_tasks = strategy.task_vector_count()
    if n_tasks != data.options.n_modules:
        return None
    o = data.options
    strategy.model.eval()

    def acc(coefficients, tasks: TaskSet) -> float:
        features = strategy.features_at(coefficients)

        def feats(x):
            with torch.no_grad():
                flat = data.inputs(tasks, x).reshape(-1, data.input_dim).to(strategy.device)
                return features(flat).reshape(len(tasks), x.shape[1], -1).cpu()

        (sx, ss, _), (tx, ts, _) = tasks.support(), tasks.test()
        logits, _ = _probe_head(feats(sx), ss, feats(tx), o.probe_steps, o.probe_lr)
        return C.agreement_accuracy(logits, ts)

    def coeff(**weights) -> list[float]:
        return [weights.get(f"m{t}", 0.0) for t in range(n_tasks)]

    combos = [pairs.combinations[i][0] for i in pair_idx]
    by_combo = {
        c: pairs.subset([j for j in range(len(pairs)) if int(pairs.combination[j]) == i])
        for i, c in zip(pair_idx, combos)
    }
    first = combos[0]
    lam = max((0.5, 1.0), key=lambda lam_: acc(coeff(**{f"m{first[0]}": lam_, f"m{first[1]}": lam_}), by_combo[first]))
    rest = combos[1:] or combos
    merged = [acc(coeff(**{f"m{a}": lam, f"m{b}": lam}), by_combo[(a, b)]) for a, b in rest]
    singles = [
        [acc(coeff(**{f"m{a}": 1.0}), by_combo[(a, b)]), acc(coeff(**{f"m{b}": 1.0}), by_combo[(a, b)])]
        for a, b in rest
    ]
    return C.composition_gain(merged, singles)
