"""Avalanche strategies for compositional and incremental learning: ITA, IEL, task arithmetic, baselines,
template-mixture networks and meta-learners, with the pieces they are built from.

The public surface (imported lazily, so that ``import clcompose.strategies`` stays cheap)::

    from clcompose.strategies import ITA, IEL, TaskArithmetic, TrainConfig, ClassIncrementalNet

    strategy = ITA(model=ClassIncrementalNet(backbone), options=ITAOptions(tuning="lora", alpha=0.1),
                   train=TrainConfig(epochs=5, optimizer="adamw", lr=3e-4), evaluator=my_evaluation_plugin)

Subpackages, one per family: ``core`` (registry and options, training settings, heads, the Fisher, protocols),
``task_vectors`` (ITA, IEL, task arithmetic and their pieces), ``baselines`` (Avalanche's naive, joint, EWC,
LwF, DER++; SLCA), ``prompts`` (L2P, CODA-Prompt, InfLoRA on a ViT), ``templates`` (template-mixture
networks), ``meta`` (meta-learned students), ``metrics`` (pure functions).
"""

from __future__ import annotations

import importlib

from clcompose.strategies import _torchvision_compat

_torchvision_compat.install()

_PUBLIC = {
    "ITA": "clcompose.strategies.task_vectors.ita",
    "IEL": "clcompose.strategies.task_vectors.iel",
    "TaskArithmetic": "clcompose.strategies.task_vectors.task_arithmetic",
    "LambdaSelection": "clcompose.strategies.task_vectors.task_arithmetic",
    "TMC": "clcompose.strategies.task_vectors.tangent",
    "TMCOptions": "clcompose.strategies.task_vectors.tangent",
    "MagMax": "clcompose.strategies.task_vectors.magmax",
    "MagMaxOptions": "clcompose.strategies.task_vectors.magmax",
    "TaskVectorStrategy": "clcompose.strategies.task_vectors.base",
    "ITAOptions": "clcompose.strategies.task_vectors.options",
    "IELOptions": "clcompose.strategies.task_vectors.options",
    "TaskArithmeticOptions": "clcompose.strategies.task_vectors.options",
    "TaskVectorOptions": "clcompose.strategies.task_vectors.options",
    "TaskVectorPool": "clcompose.strategies.task_vectors.pool",
    "ComposableNet": "clcompose.strategies.task_vectors.composable",
    "DERPlusPlus": "clcompose.strategies.baselines.derpp",
    "DERPPOptions": "clcompose.strategies.baselines.derpp",
    "SLCA": "clcompose.strategies.baselines.slca",
    "SLCAOptions": "clcompose.strategies.baselines.slca",
    "TrainConfig": "clcompose.strategies.core.training",
    "ClassIncrementalNet": "clcompose.strategies.core.heads",
    "ExperienceHeads": "clcompose.strategies.core.heads",
    "FisherAccumulator": "clcompose.strategies.core.fisher",
    "STRATEGIES": "clcompose.strategies.core.registry",
    "ConfigError": "clcompose.strategies.core.registry",
    "Options": "clcompose.strategies.core.registry",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
