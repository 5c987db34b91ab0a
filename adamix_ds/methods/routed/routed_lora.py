"""`RoutedLoRA`: M LoRA experts on one frozen projection mixed per token by a learned router.

The homogeneous MoE-LoRA baselines beside MoA:
- molora (Zadouri et al., 2023): M experts (A_m, B_m), dense softmax gates;
- hydralora (Tian et al., 2024): one shared A, M B's, dense softmax gates;
- topk-lora: M experts, softmax over each token's k best, with the load-balancing loss.

    y = W x + (alpha / r) sum_m w_m(x) B_m A_m x

All experts are evaluated as two matmuls over the stacked ranks (x A^T with A stacked to (M r, in), then
the gate-weighted (N, M r) activations times B stacked to (M r, out)): with rank-r experts this is M r
extra columns, cheaper than a gather and scatter per expert; top-k's zero weights keep the sum exact.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..lora import StackedLoRA
from .token_router import Gates, TokenRouter


class RoutedLoRA(StackedLoRA):
    """lora_A: (1 if shared else M, r, in), lora_B: (M, out, r), router: a TokenRouter over M experts."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, num_experts: int, shared_a: bool,
                 gate: str, network: str = "linear", top_k: int = 2, dropout: float = 0.0) -> None:
        router = TokenRouter(in_features, num_experts, gate, network, top_k=top_k)  # drawn first, as before 0.1
        super().__init__(in_features, out_features, r, alpha, 1 if shared_a else num_experts, num_experts, dropout)
        self.router = router

    @property
    def num_experts(self) -> int:
        return self.lora_B.shape[0]

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, Gates]:
        """x (..., in) -> (the update (..., out) in x's dtype, the gates of the N = prod(...) tokens)."""
        flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        gates = self.router(flat, valid)
        h = self.lora_input(flat, self.training)
        m, r = self.num_experts, self.r
        low = F.linear(h, self.lora_A.reshape(-1, h.shape[-1])).view(h.shape[0], -1, r).expand(-1, m, r)
        mixed = (low * gates.weights.to(low.dtype)[:, :, None]).reshape(h.shape[0], m * r)
        out = F.linear(mixed, self.lora_B.permute(1, 0, 2).reshape(-1, m * r)) * self.scaling
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype), gates
