"""Which `HookedMixtures` class implements a method: AdaMix (and LoRA/adapter), MoA, or MoE-LoRA."""

from __future__ import annotations

from torch import nn

from ..config import HOMOGENEOUS_METHODS, MOA_METHODS, MixtureConfig
from .adamix.mixture_set import MixtureSet
from .hooks import HookedMixtures
from .routed.moa_set import MoASet
from .routed.moe_lora_set import MoELoRASet


def mixture_class(config: MixtureConfig) -> type[HookedMixtures]:
    if config.method in MOA_METHODS:
        return MoASet
    if config.method in HOMOGENEOUS_METHODS:
        return MoELoRASet
    return MixtureSet


def inject_mixtures(model: nn.Module, config: MixtureConfig, seed: int = 0) -> HookedMixtures:
    """Build the configured method's mixtures for `model` and attach them."""
    return mixture_class(config).inject(model, config, seed)
