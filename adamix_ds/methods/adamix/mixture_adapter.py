"""`MixtureAdapter`: M Houlsby bottleneck adapters at one insertion point (AdaMix over adapters)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..activations import ACTIVATION_FUNCTIONS
from ..expert_init import init_stack_
from .stacked_experts import group_rows, grouped_linear, select_experts, ungroup_rows
from .stochastic_routing import Choice


class MixtureAdapter(nn.Module):
    """The residual update up_j(act(down_i(h))) of a bottleneck adapter (Houlsby et al., 2019; AdaMix Eq. 1-2).

    The caller adds it to h, the output of the block it follows. down: (experts_down, size, hidden) with
    bias (experts_down, size); up: (experts_up, hidden, size) with bias (experts_up, hidden). Up starts at
    zero, so the adapter starts as the identity.
    """

    def __init__(self, hidden: int, size: int, activation: str, experts_down: int, experts_up: int,
                 init: str = "houlsby", identical: bool = False) -> None:
        super().__init__()
        self.hidden, self.size, self.activation = hidden, size, activation
        self.act = ACTIVATION_FUNCTIONS[activation]
        self.adapter_down = nn.Parameter(torch.empty(experts_down, size, hidden))
        self.adapter_down_bias = nn.Parameter(torch.zeros(experts_down, size))
        self.adapter_up = nn.Parameter(torch.zeros(experts_up, hidden, size))
        self.adapter_up_bias = nn.Parameter(torch.zeros(experts_up, hidden))
        self.reset_parameters(init, identical)

    def reset_parameters(self, init: str = "houlsby", identical: bool = False) -> None:
        """houlsby: down N(0, 0.01), up 0 (the adapter starts as the identity, Houlsby et al.); bert: down and up
        N(0, 0.02), as BERT initialises every linear layer, which is how the AdaMix reference's adapters start.
        Biases 0. Each expert drawn on its own, or (`identical`) once and copied into every expert of its side."""
        down_std, up_std = {"houlsby": (1e-2, 0.0), "bert": (2e-2, 2e-2)}[init]
        for stack, std in ((self.adapter_down, down_std), (self.adapter_up, up_std)):
            draw = (lambda expert, std=std: nn.init.normal_(expert, std=std)) if std else nn.init.zeros_
            init_stack_(stack.data, draw, identical)
        nn.init.zeros_(self.adapter_down_bias)
        nn.init.zeros_(self.adapter_up_bias)

    @property
    def experts_down(self) -> int:
        return self.adapter_down.shape[0]

    @property
    def experts_up(self) -> int:
        return self.adapter_up.shape[0]

    def forward(self, h: torch.Tensor, down: Choice, up: Choice, training: bool = False) -> torch.Tensor:
        """h: (rows, ..., hidden) -> the adapter's residual update, same shape and dtype.

        `training` is accepted for symmetry with MixtureLoRA; adapters have no dropout of their own.
        """
        wd, bd = select_experts(self.adapter_down, down), select_experts(self.adapter_down_bias, down)
        wu, bu = select_experts(self.adapter_up, up), select_experts(self.adapter_up_bias, up)
        x = h.to(wd.dtype)
        if wd.shape[0] == 1 and wu.shape[0] == 1:
            out = F.linear(self.act(F.linear(x, wd[0], bd[0])), wu[0], bu[0])
        else:
            ensemble = "ensemble" in (down, up)
            xg = group_rows(x, wd, wu, ensemble)
            out = ungroup_rows(grouped_linear(self.act(grouped_linear(xg, wd, bd)), wu, bu), x, ensemble)
        return out.to(h.dtype)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, size={self.size}, activation={self.activation}, "
            f"experts_down={self.experts_down}, experts_up={self.experts_up}"
        )
