"""`MixtureLoRA`: M LoRA experts on one frozen linear layer (AdaMix over LoRA)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .stacked_experts import group_rows, grouped_linear, select_experts, ungroup_rows
from .stochastic_routing import Choice


class MixtureLoRA(nn.Module):
    """The update (alpha / r) B_j A_i x of LoRA (Hu et al., Eq. 3) with experts i, j chosen by the route.

    lora_A: (experts_down, r, in_features), lora_B: (experts_up, out_features, r). A shared side is a stack
    of one. B starts at zero, so the model's output at step 0 is the base model's. With one expert on each
    side this is exactly plain LoRA.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        experts_down: int,
        experts_up: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(experts_down, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(experts_up, out_features, r))
        self.dropout = dropout
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each A expert drawn independently as nn.Linear does (kaiming-uniform, a = sqrt(5)); B = 0."""
        for expert in self.lora_A.data:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def experts_down(self) -> int:
        return self.lora_A.shape[0]

    @property
    def experts_up(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor, down: Choice, up: Choice, training: bool = False) -> torch.Tensor:
        """x: (rows, ..., in_features) -> the LoRA update (rows, ..., out_features), in x's dtype.

        `training` switches the input dropout; it follows the wrapped base layer's mode.
        """
        a = select_experts(self.lora_A, down)
        b = select_experts(self.lora_B, up)
        h = F.dropout(x, self.dropout, training) if self.dropout > 0 else x
        h = h.to(a.dtype)
        if a.shape[0] == 1 and b.shape[0] == 1:
            out = F.linear(F.linear(h, a[0]), b[0])
        else:
            ensemble = "ensemble" in (down, up)
            hg = group_rows(h, a, b, ensemble)
            out = ungroup_rows(grouped_linear(grouped_linear(hg, a), b), h, ensemble)
        return (out * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features): the merged update (alpha / r) B_bar A_bar, experts averaged per side."""
        return self.scaling * self.lora_B.mean(dim=0) @ self.lora_A.mean(dim=0)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
            f"experts_down={self.experts_down}, experts_up={self.experts_up}"
        )
