"""The heterogeneous experts of MoA (arXiv 2506.05928, Sec. 3.1) and how a gate applies to them.

Each expert maps a frozen module's input rows to an update of its output rows. `gated_update` runs an
expert on every row scaled by its gate (soft), or on the active rows only (sparse: gather, compute,
scatter), so a sparse expert costs FLOPs in proportion to the tokens that chose it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..activations import ACTIVATION_FUNCTIONS
from ..lora import StackedLoRA


class LoRAExpert(StackedLoRA):
    """(alpha / r) B A x on one frozen projection: a single LoRA expert (lora_A (r, in), lora_B (out, r))."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(in_features, out_features, r, alpha, dropout=dropout, stacked=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single(self.lora_input(x, self.training), self.lora_A, self.lora_B)


class ParallelAdapter(nn.Module):
    """up(act(down(x))) beside the MLP, reading its normed input; both weights xavier-initialised with gain
    1e-4, so the expert starts near zero without being exactly zero (MoA's parallel adapter)."""

    def __init__(self, hidden: int, bottleneck: int, activation_name: str = "silu") -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        self.act = ACTIVATION_FUNCTIONS[activation_name]
        for layer in (self.down, self.up):
            nn.init.xavier_uniform_(layer.weight, gain=1e-4)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class PromptExpert(nn.Module):
    """Zero-gated attention prompt (LLaMA-Adapter, Zhang et al. 2023, Eq. 6-8): `length` learned vectors per
    layer, projected by the layer's frozen key and value projections; every query attends to them with a
    softmax of its own, scaled per head by a gate that starts at 0, and the result joins the attention
    output before the output projection."""

    def __init__(self, length: int, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, hidden))
        self.head_gate = nn.Parameter(torch.zeros(num_heads))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """query (N, H, D) with its rotary embedding; keys, values (P, H_kv, D) -> (N, H * D) in fp32."""
        heads, head_dim = query.shape[1], query.shape[2]
        groups = heads // keys.shape[1]
        keys = keys.float().repeat_interleave(groups, dim=1)
        values = values.float().repeat_interleave(groups, dim=1)
        scores = torch.einsum("nhd,phd->nhp", query.float(), keys) / math.sqrt(head_dim)
        out = torch.einsum("nhp,phd->nhd", scores.softmax(dim=-1), values)
        return (out * self.head_gate.float()[None, :, None]).reshape(query.shape[0], heads * head_dim)


def gated_update(expert, x: torch.Tensor, weight: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    """sum over rows n of weight[n] * expert(x[n]), computed only where active[n] (all rows when None).

    x: (N, in); weight, active: (N,). Returns (N, out) in the expert's dtype; inactive rows are zero.
    """
    if active is None:
        return expert(x) * weight[:, None].to(x.dtype)
    rows = active.nonzero().squeeze(1)
    y = expert(x.index_select(0, rows)) * weight.index_select(0, rows)[:, None].to(x.dtype)
    return y.new_zeros(x.shape[0], y.shape[1]).index_add(0, rows, y)
