"""`MixtureLoRA`: M LoRA experts on one frozen linear layer (AdaMix over LoRA)."""

from __future__ import annotations

import torch

from ..lora import StackedLoRA
from .stacked_experts import group_rows, grouped_linear, select_experts, ungroup_rows
from .stochastic_routing import Choice


class MixtureLoRA(StackedLoRA):
    """The update (alpha / r) B_j A_i x of LoRA (Hu et al., Eq. 3) with experts i, j chosen by the route.

    lora_A: (experts_down, r, in_features), lora_B: (experts_up, out_features, r); a shared side is a stack of
    one. With one expert on each side this is exactly plain LoRA.
    """

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, experts_down: int,
                 experts_up: int, dropout: float = 0.0, identical: bool = False) -> None:
        super().__init__(in_features, out_features, r, alpha, experts_down, experts_up, dropout, identical=identical)

    def forward(self, x: torch.Tensor, down: Choice, up: Choice, training: bool = False) -> torch.Tensor:
        """x: (rows, ..., in_features) -> the LoRA update (rows, ..., out_features), in x's dtype.

        `training` switches the input dropout; it follows the wrapped base layer's mode.
        """
        a = select_experts(self.lora_A, down)
        b = select_experts(self.lora_B, up)
        h = self.lora_input(x, training)
        if a.shape[0] == 1 and b.shape[0] == 1:
            return self.single(h, a[0], b[0]).to(x.dtype)
        ensemble = "ensemble" in (down, up)
        hg = group_rows(h, a, b, ensemble)
        out = ungroup_rows(grouped_linear(grouped_linear(hg, a), b), h, ensemble)
        return (out * self.scaling).to(x.dtype)
