"""Which `HookedMixtures` class implements a method, by its kind of experts (config.METHODS says which kind)."""

from __future__ import annotations

from torch import nn

from ..config import MixtureConfig
from .adamix.mixture_set import MixtureSet
from .hooks import HookedMixtures
from .routed.moa_set import MoASet
from .routed.moe_lora_set import MoELoRASet

MIXTURE_CLASSES: dict[str, type[HookedMixtures]] = {
    "lora": MixtureSet, "adapter": MixtureSet, "moa": MoASet, "routed-lora": MoELoRASet,
}


def mixture_class(config: MixtureConfig) -> type[HookedMixtures]:
    if config.spec.experts not in MIXTURE_CLASSES:
        raise ValueError(f"--method {config.method} trains the base itself; it has no mixtures")
    return MIXTURE_CLASSES[config.spec.experts]


def resolve_targets(model: nn.Module, config: MixtureConfig) -> list:
    """The configured method's insertion points on `model`, in module order (their index is the routing slot)."""
    return mixture_class(config).locate(model, config)


def inject_mixtures(model: nn.Module, config: MixtureConfig, seed: int = 0) -> HookedMixtures:
    """Build the configured method's mixtures for `model` and attach them."""
    return mixture_class(config).inject(model, config, seed)
