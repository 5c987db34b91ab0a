"""Parameter accounting: what is trained, and what is served after merging, against the base model."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from torch import nn

from ..distributed.sharded import full_numel
from .hooks import HookedMixtures

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParameterCount:
    base: int
    trained: int
    served: int
    """Parameters of the merged model's single module per insertion point (what a user serves)."""

    @property
    def trained_percent(self) -> float:
        return 100.0 * self.trained / self.base

    @property
    def served_percent(self) -> float:
        return 100.0 * self.served / self.base

    def to_dict(self) -> dict:
        return {**asdict(self), "trained_percent": self.trained_percent, "served_percent": self.served_percent}

    def summary(self) -> str:
        return (
            f"base parameters: {self.base:,} | trained: {self.trained:,} ({self.trained_percent:.4f}%) | "
            f"served after merge: {self.served:,} ({self.served_percent:.4f}%)"
        )


def count_parameters(model: nn.Module, mixtures: HookedMixtures) -> ParameterCount:
    """Counts from shapes (ZeRO-3 aware). AdaMix serves each stacked tensor's size divided by its expert
    count (the experts merge); the routed methods serve everything they train."""
    base = sum(full_numel(p) for p in model.parameters())
    trained = sum(p.numel() for p in mixtures.parameters() if p.requires_grad)
    if mixtures.config.is_routed:
        served = trained  # input-dependent routers: every expert and router is served
    else:
        served = sum(p.numel() // p.shape[0] for p in mixtures.parameters())
    count = ParameterCount(base=base, trained=trained, served=served)
    logger.info(count.summary())
    return count
