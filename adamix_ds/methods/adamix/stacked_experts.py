"""Stacked experts: M modules stored as one tensor with a leading expert dimension.

A mixture indexes its stacks by the route inside forward, so the module graph is the same whatever
the route (required when the base is sharded by ZeRO-3 and ranks must run identical graphs).
"""

from __future__ import annotations

import torch

from .stochastic_routing import Choice


def select_experts(stack: torch.Tensor, choice: Choice) -> torch.Tensor:
    """(M, ...) -> (K, ...): the chosen experts (K = groups), their mean ('merged', K = 1) or all ('ensemble').

    The mean is taken from the current weights on every call, so merged evaluation can never be stale.
    """
    if choice == "merged":
        return stack.mean(dim=0, keepdim=True)
    if choice == "ensemble":
        return stack
    if len(choice) == 1:
        return stack[choice[0]].unsqueeze(0)
    return stack.index_select(0, torch.tensor(choice, device=stack.device))  # one op for any number of groups


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Group-wise linear map with broadcasting over the group dimension.

    x: (G, n, in) or (1, n, in); weight: (K, out, in); bias: (K, out) -> (max(G, K), n, out).
    """
    out = torch.matmul(x, weight.transpose(-1, -2))
    if bias is not None:
        out = out + bias.unsqueeze(1)
    return out


def group_rows(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """View x (rows, ..., features) as (G, n, features) for the chosen experts.

    Rows are split into G equal, contiguous groups, one per route; in ensemble mode every expert sees all rows.
    """
    groups = 1 if ensemble else max(down.shape[0], up.shape[0])
    return x.reshape(groups, -1, x.shape[-1])


def ungroup_rows(out: torch.Tensor, like: torch.Tensor, ensemble: bool) -> torch.Tensor:
    """Back from (G, n, out) to like's leading shape; ensemble mode averages over the experts."""
    if ensemble:
        out = out.mean(dim=0)
    return out.reshape(*like.shape[:-1], out.shape[-1])
