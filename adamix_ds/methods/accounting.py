"""Parameter accounting: what is trained, and what is served after merging, against the base model."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from torch import nn

from ..distributed.quantized_weights import base_numel
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
    """Counts from shapes (ZeRO-3 aware; a quantized weight counts as the weight it stands for); what is served
    after merging is the family's to say."""
    base = base_numel(model)
    trained = sum(p.numel() for p in mixtures.parameters() if p.requires_grad)
    count = ParameterCount(base=base, trained=trained, served=mixtures.served_parameters())
    logger.info(count.summary())
    return count
