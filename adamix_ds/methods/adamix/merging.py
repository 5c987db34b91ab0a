"""Merging (AdaMix, Sec. 3.3): average the experts into one module, and fold a LoRA delta into the base.

A and B are averaged separately, as the reference implementation does: the merged update is
B_bar A_bar, not mean_i B_i A_i. All operations are explicit calls; nothing merges on a mode switch.
"""

from __future__ import annotations

import torch
from torch import nn

from ...distributed.sharded import gathered
from .mixture_set import MixtureSet


def average_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pure function over a mixture state dict: every stacked tensor (M, ...) becomes its mean (1, ...)."""
    return {name: t.float().mean(dim=0, keepdim=True).to(t.dtype) for name, t in state.items()}


def merge_experts(mixtures: MixtureSet) -> MixtureSet:
    """A new, detached MixtureSet with one expert per side holding the averaged weights.

    It has exactly the parameters of a single LoRA/adapter module at every insertion point.
    """
    merged = MixtureSet(mixtures.config.merged(), mixtures.targets, mixtures.router.seed)
    averaged = average_experts(dict(mixtures.mixtures.state_dict()))
    merged.mixtures.load_state_dict(averaged, strict=True)
    return merged.to(next(mixtures.parameters()).device)


def _base_weight(model: nn.Module, name: str) -> torch.Tensor:
    return dict(model.named_modules())[name].weight


def _fold(model: nn.Module, mixtures: MixtureSet, sign: float) -> None:
    for target, mixture in zip(mixtures.targets, mixtures.mixtures):
        weight = _base_weight(model, target.name)
        with gathered([weight], modifier_rank=0), torch.no_grad():
            delta = mixture.delta_weight().to(torch.float32)
            if target.transposed:
                delta = delta.T
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))


def fold_into_base(model: nn.Module, mixtures: MixtureSet) -> None:
    """W <- W + (alpha / r) B_bar A_bar for every target, then detach the mixtures: zero serving overhead.

    Idempotent: a set already folded is left as it is.
    """
    if mixtures.folded:
        return
    if not mixtures.config.is_lora:
        raise ValueError(f"only LoRA deltas fold into base weights, not --method {mixtures.config.method}")
    mixtures.detach()
    _fold(model, mixtures, +1.0)
    mixtures.folded = True


def unfold_from_base(model: nn.Module, mixtures: MixtureSet) -> None:
    """Undo fold_into_base: subtract the delta again and re-attach the mixtures.

    Exact up to rounding: in fp32 to about 1e-7 relative; in bf16 W + delta - delta need not round back to W.
    """
    if not mixtures.folded:
        return
    _fold(model, mixtures, -1.0)
    mixtures.folded = False
    mixtures.attach(model)
