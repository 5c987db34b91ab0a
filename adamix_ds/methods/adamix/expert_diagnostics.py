"""Per-layer expert diagnostics for TensorBoard: how often each expert is chosen, and how far apart the
experts of a layer have moved (AdaMix merges by averaging, which works while experts stay close)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.nn import functional as F

from ..targets import layer_of
from .mixture_set import MixtureSet
from .stochastic_routing import DOWN

SIDES = {DOWN: "down", 1: "up"}


def selection_counts(mixtures: MixtureSet) -> dict[str, float]:
    """experts/selection_count/layer_L/{down,up}/expert_E since the last call (the router's counts, then reset)."""
    totals: dict[str, float] = defaultdict(float)
    for (slot, side, expert), count in mixtures.router.counts.items():
        layer = layer_of(mixtures.targets[slot].name)
        totals[f"experts/selection_count/layer_{layer}/{SIDES[side]}/expert_{expert}"] += count
    mixtures.router.counts.clear()
    return dict(totals)


def pairwise_cosine_distance(stack: torch.Tensor) -> float:
    """Mean over pairs i < j of 1 - cos(expert_i, expert_j) for a stack (M, ...) with M >= 2."""
    flat = F.normalize(stack.detach().float().reshape(stack.shape[0], -1), dim=1)
    similarity = flat @ flat.T
    m = stack.shape[0]
    pairs = similarity[torch.triu_indices(m, m, offset=1).unbind()]
    return float((1.0 - pairs).mean())


def expert_divergence(mixtures: MixtureSet) -> dict[str, float]:
    """experts/divergence/layer_L: mean pairwise cosine distance of the mixed (non-shared) expert weights."""
    per_layer: dict[str, list[float]] = defaultdict(list)
    for target, mixture in zip(mixtures.targets, mixtures.mixtures):
        for param in mixture.parameters():
            if param.dim() >= 3 and param.shape[0] > 1:
                per_layer[layer_of(target.name)].append(pairwise_cosine_distance(param))
    return {f"experts/divergence/layer_{layer}": sum(v) / len(v) for layer, v in per_layer.items()}
