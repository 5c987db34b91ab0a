"""Training the routed methods (moa-soft, moa-sparse, molora, hydralora, topk-lora) on the replicated step.

What the family adds to ReplicatedTrainer: routing is learned and per token, so the routers are trained
modules like the experts, with no route plan and no consistency loss; topk-lora adds its load-balancing
loss; the diagnostics are the routers' gates.
"""

from __future__ import annotations

import torch

from .losses import causal_lm_losses
from .replicated_trainer import ReplicatedTrainer

ROUTED_EVAL_MODE = "routed"


class RoutedTrainer(ReplicatedTrainer):
    def micro_step(self, batch: dict) -> torch.Tensor:
        """CE sum (+ aux weight x aux loss x target tokens, so that the token normalisation of the step
        turns it into the token-weighted mean of the micro-batches' aux losses)."""
        stats, weight = self.mixtures.stats, self.mixture_config.aux_weight
        stats.valid = batch["attention_mask"]  # until after the backward, where checkpointed layers recompute
        try:
            sums = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    chunk_tokens=self.args.loss_chunk_tokens,
                                    label_smoothing=self.args.label_smoothing_factor)
            aux = stats.pop_aux_loss()
            total, aux_sum = sums.lm, 0.0
            if aux is not None and weight > 0:
                total = total + weight * sums.tokens * aux
                aux_sum = aux.item() * sums.tokens
            total.backward()
        finally:
            stats.valid = None
        return torch.tensor([sums.tokens, sums.lm.item(), 0.0, aux_sum], dtype=torch.float64)

    def step_metrics(self, lm: float, kl: float, aux: float) -> dict:
        weight = self.mixture_config.aux_weight
        return {"train/loss": lm + weight * aux, "train/lm_loss": lm, **({"train/aux_loss": aux} if weight > 0 else {})}

    def extra_metrics(self) -> dict:
        return self.mixtures.stats.metrics()

    def eval_mode_names(self) -> list[str]:
        """The learned routers route evaluation as they route training."""
        return [ROUTED_EVAL_MODE]

    def eval_sums(self, batch: dict, rows: list[int], mode: str) -> tuple[int, float]:
        out = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                               chunk_tokens=self.args.loss_chunk_tokens)
        return out.tokens, out.lm.item()
