"""The template-mixture network of :mod:`clcompose.strategies.templates.network` as the ``template-mixture`` backbone."""

from __future__ import annotations

from torch import nn

from clcompose.bench.models.backbones import BACKBONES
from clcompose.strategies.templates.network import ProgramNet, TemplateMixtureNet, TemplateMixtureOptions


@BACKBONES.register("template-mixture", TemplateMixtureOptions)
def template_mixture(options: TemplateMixtureOptions) -> nn.Module:
    """Template-mixture isometric ResNet (Zhmoginov et al.): L blocks mixed from N shared templates; trained from scratch."""
    return ProgramNet(TemplateMixtureNet(options))
