"""Router diagnostics of the routed methods, accumulated over training forwards and reported per layer.

MoA reports the per-token standard deviation of router weights across experts (low = collapsed onto
uniform gates), per-expert gate means per layer and, for sparse routing, the active experts per token.
Sums are kept on the device and all-reduced when read, so every rank logs the same global numbers.
"""

from __future__ import annotations

import torch

from ... import distributed
from .token_router import Gates


class RouterStats:
    """Per-layer sums over real (non-padding) training tokens; `metrics()` reads and resets them."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.names: dict[str, list[str]] = {}
        self.sparse: set[str] = set()
        self.aux_losses: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None
        """(B, T) attention mask of the batch being trained on, set by the trainer; None counts every token."""
        self.visited: set[str] = set()

    def new_forward(self, *_args) -> None:
        """Forward pre-hook of the decoder: a fresh list of load-balancing losses (an unread one never piles
        up) and no router seen yet."""
        self.aux_losses.clear()
        self.visited.clear()

    def first_visit(self, router: str) -> bool:
        """True the first time `router` runs in this forward; a recomputation by activation checkpointing
        must not count its tokens or its load-balancing loss again."""
        if router in self.visited:
            return False
        self.visited.add(router)
        return True

    def valid_rows(self, rows: int) -> torch.Tensor | None:
        """The flattened token mask when it describes `rows` tokens (else None: generation, odd shapes)."""
        if self.valid is None or self.valid.numel() != rows:
            return None
        return self.valid.reshape(-1).bool()

    def add(self, layer: str, expert_names: list[str], gates: Gates, valid: torch.Tensor | None) -> None:
        with torch.no_grad():
            scores = gates.scores if valid is None else gates.scores[valid]
            active = None if gates.active is None else (gates.active if valid is None else gates.active[valid])
            row = torch.cat([
                scores.sum(dim=0),
                scores.std(dim=-1, unbiased=False).sum().reshape(1),
                (active.sum() if active is not None else scores.new_zeros(())).reshape(1).float(),
                scores.new_tensor([float(scores.shape[0])]),
            ]).double()
        if layer in self.sums:
            self.sums[layer] += row
        else:
            self.sums[layer] = row
            self.names[layer] = expert_names
        if active is not None:
            self.sparse.add(layer)

    def add_aux_loss(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self.aux_losses.append(loss)

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Mean load-balancing loss of the routers of the last forward (with its graph), or None."""
        losses, self.aux_losses = self.aux_losses, []
        return torch.stack(losses).mean() if losses else None

    def metrics(self) -> dict[str, float]:
        """Collective: routers/layer_L/{mean_gate/<expert>, gate_std, active_experts} since the last call, and
        their means over layers as routers/{mean_gate/<expert>, gate_std, active_experts}."""
        layers = sorted(self.sums, key=_layer_key)
        if not layers:
            return {}
        flat = distributed.all_reduce_sum(torch.cat([self.sums[layer] for layer in layers]).cpu())
        out, offset = {}, 0
        for layer in layers:
            names = self.names[layer]
            values = flat[offset:offset + len(names) + 3]
            offset += len(names) + 3
            tokens = max(values[-1].item(), 1.0)
            for name, total in zip(names, values[:len(names)].tolist()):
                out[f"routers/layer_{layer}/mean_gate/{name}"] = total / tokens
            out[f"routers/layer_{layer}/gate_std"] = values[len(names)].item() / tokens
            if layer in self.sparse:
                out[f"routers/layer_{layer}/active_experts"] = values[len(names) + 1].item() / tokens
        self.sums.clear()
        return {**out, **_layer_means(out)}


def _layer_means(per_layer: dict[str, float]) -> dict[str, float]:
    """routers/layer_L/<metric> averaged over L into routers/<metric>."""
    groups: dict[str, list[float]] = {}
    for key, value in per_layer.items():
        groups.setdefault("routers/" + key.split("/", 2)[2], []).append(value)
    return {key: sum(values) / len(values) for key, values in groups.items()}


def _layer_key(layer: str):
    return (0, int(layer)) if layer.isdigit() else (1, layer)
