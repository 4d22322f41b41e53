"""Avalanche strategies for compositional and incremental learning (ITA, IEL, baselines)."""

from strategies import _torchvision_compat

_torchvision_compat.install()
