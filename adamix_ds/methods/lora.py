"""`StackedLoRA`: the one LoRA implementation of every method, with its scaling and initialisation.

LoRA (Hu et al., 2021, Eq. 3) adds (alpha / r) B A x to a frozen linear layer W x. Here A and B are stacks of
experts: lora_A (experts_a, r, in_features) and lora_B (experts_b, out_features, r), with B = 0 at the start so
that the model's output at step 0 is the base model's. AdaMix (MixtureLoRA) picks an expert per side by its
stochastic route, the MoE-LoRA baselines (RoutedLoRA) mix all experts per token by a learned router, MoA uses a
stack of one per projection (stored without the expert dimension, as its checkpoints keep it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .expert_init import init_stack_


class StackedLoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, experts_a: int = 1,
                 experts_b: int = 1, dropout: float = 0.0, stacked: bool = True, identical: bool = False) -> None:
        super().__init__()
        if not stacked and (experts_a, experts_b) != (1, 1):
            raise ValueError("only a single expert per side is stored without the expert dimension")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.dropout = dropout
        lead = lambda experts: (experts,) if stacked else ()  # noqa: E731
        self.lora_A = nn.Parameter(torch.empty(*lead(experts_a), r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(*lead(experts_b), out_features, r))
        self.reset_parameters(identical)

    def reset_parameters(self, identical: bool = False) -> None:
        """A drawn as nn.Linear initialises its weight (kaiming-uniform, a = sqrt(5)): each expert on its own, or
        (`identical`) once and copied into every expert, as the AdaMix reference deep-copies one LoRA A. B = 0."""
        init_stack_(self.stack_a.data, lambda expert: nn.init.kaiming_uniform_(expert, a=math.sqrt(5)), identical)
        nn.init.zeros_(self.lora_B)

    @property
    def stack_a(self) -> torch.Tensor:
        """lora_A as (experts_a, r, in_features)."""
        return self.lora_A if self.lora_A.dim() == 3 else self.lora_A.unsqueeze(0)

    @property
    def stack_b(self) -> torch.Tensor:
        """lora_B as (experts_b, out_features, r)."""
        return self.lora_B if self.lora_B.dim() == 3 else self.lora_B.unsqueeze(0)

    @property
    def experts_down(self) -> int:
        return self.stack_a.shape[0]

    @property
    def experts_up(self) -> int:
        return self.stack_b.shape[0]

    def lora_input(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """The input the A side reads: dropout in training (as LoRA places it), in the experts' dtype."""
        h = F.dropout(x, self.dropout, training) if self.dropout > 0 else x
        return h.to(self.lora_A.dtype)

    def single(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(alpha / r) b a x for one expert per side: a (r, in), b (out, r); x (..., in) -> (..., out)."""
        return F.linear(F.linear(x, a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(out_features, in_features): the merged update (alpha / r) B_bar A_bar, experts averaged per side
        (AdaMix, Sec. 3.3: A and B are averaged separately, as the reference does)."""
        return self.scaling * self.stack_b.mean(dim=0) @ self.stack_a.mean(dim=0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"experts_down={self.experts_down}, experts_up={self.experts_up}")
