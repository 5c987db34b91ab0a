"""`TokenRouter`: the learned per-token router of the routed methods (MoA and the MoE-LoRA baselines).

One network (linear, or a SwiGLU MLP with hidden 4 x experts) maps a token's hidden state to one
logit per expert; the gate function turns logits into the weight that scales each expert's output:

- sigmoid (MoA, Sec. 3.2): independent gates g_e = sigmoid(z_e), no softmax, no temperature;
- sigmoid with a learned threshold (Sparse MoA): t = sigmoid(w_t . x) * max_threshold per token; the
  expert is active where g_e >= t and weighted by g_e - t (zero at the threshold, so the output is
  continuous in t and the threshold network receives gradient: the reference code multiplies the raw
  gate by a hard mask, which leaves the threshold untrained);
- softmax (MoLoRA, HydraLoRA): w = softmax(z);
- top-k softmax (MoE-LoRA): softmax over the k largest logits, zero elsewhere, with the Switch
  Transformer load-balancing loss  M * sum_e f_e * P_e  (f_e: share of token-slots routed to e, P_e:
  mean softmax probability of e) available for the trainer to add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

GATES = ("sigmoid", "threshold", "softmax", "topk")


@dataclass
class Gates:
    """The routing of N tokens over E experts."""

    weights: torch.Tensor
    """(N, E): the factor of each expert's output; zero where inactive."""
    active: torch.Tensor | None
    """(N, E) bool for sparse gates (threshold, topk); None when every expert runs on every token."""
    scores: torch.Tensor
    """(N, E): sigmoid gates or softmax probabilities, before thresholding or top-k (for diagnostics)."""
    aux_loss: torch.Tensor | None = None
    """Load-balancing loss of these tokens (topk only)."""


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), the router MLP of MoA's SwiGLU variant."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.gate = nn.Linear(in_features, hidden, bias=False)
        self.up = nn.Linear(in_features, hidden, bias=False)
        self.down = nn.Linear(hidden, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TokenRouter(nn.Module):
    """Per-token gates over `num_experts` experts from hidden states of width `in_features`."""

    def __init__(self, in_features: int, num_experts: int, gate: str, network: str = "linear", top_k: int = 2,
                 max_threshold: float = 0.5) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"gate {gate!r} is not one of {', '.join(GATES)}")
        self.num_experts, self.gate, self.top_k, self.max_threshold = num_experts, gate, top_k, max_threshold
        if network == "linear":
            self.net = nn.Linear(in_features, num_experts, bias=False)
        elif network == "swiglu":
            self.net = SwiGLU(in_features, 4 * num_experts, num_experts)
        else:
            raise ValueError(f"router network {network!r} is not linear or swiglu")
        self.threshold = nn.Linear(in_features, 1) if gate == "threshold" else None

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> Gates:
        """x: (N, in_features) -> Gates over (N, num_experts), computed in fp32.

        `valid` (N,) bool marks the real (non-padding) tokens the load-balancing loss averages over.
        """
        z = self.net(x.to(self._dtype())).float()
        if self.gate == "sigmoid":
            g = torch.sigmoid(z)
            return Gates(weights=g, active=None, scores=g)
        if self.gate == "threshold":
            g = torch.sigmoid(z)
            t = torch.sigmoid(self.threshold(x.to(self._dtype())).float()) * self.max_threshold
            active = g >= t
            return Gates(weights=(g - t) * active, active=active, scores=g)
        p = torch.softmax(z, dim=-1)
        if self.gate == "softmax":
            return Gates(weights=p, active=None, scores=p)
        top = z.topk(self.top_k, dim=-1).indices
        active = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, top, True)
        weights = torch.softmax(z.masked_fill(~active, float("-inf")), dim=-1)
        kept = (p, active) if valid is None else (p[valid], active[valid])
        return Gates(weights=weights, active=active, scores=p, aux_loss=load_balancing_loss(*kept, self.top_k))

    def _dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype


def load_balancing_loss(probs: torch.Tensor, active: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss M * sum_e f_e * P_e (equal to 1 under perfect balance)."""
    experts = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    share = active.float().mean(dim=0) / top_k
    return experts * (share * probs.mean(dim=0)).sum()
