"""Training the routed methods (moa-soft, moa-sparse, molora, hydralora, topk-lora) beside a frozen base.

The step is MixtureTrainer's (replicated mixtures, token-sum losses, bucketed gradient all-reduce, one
optimizer step on every rank); what differs: routing is learned and per token, so there is no route
plan to broadcast or check and no consistency loss; topk-lora adds its load-balancing loss; the
diagnostics are the routers' gates; the export keeps every expert with its router (input-dependent
routing cannot be averaged into one module).
"""

from __future__ import annotations

import contextlib

import torch

from ..export.merged_model import export_with_mixtures
from .losses import causal_lm_losses
from .mixture_trainer import MixtureTrainer
from .recipe import Trainer

ROUTED_EVAL_MODE = "routed"


class RoutedTrainer(MixtureTrainer):
    def setup_routing(self) -> None:
        """Nothing to set up: the routers are trained modules, replicated like every other weight."""

    def micro_step(self, batch: dict) -> torch.Tensor:
        """CE sum (+ aux weight x aux loss x target tokens, so that the token normalisation of the step
        turns it into the token-weighted mean of the micro-batches' aux losses)."""
        stats, weight = self.mixtures.stats, self.mixture_config.aux_weight
        stats.valid = batch["attention_mask"]  # until after the backward, where checkpointed layers recompute
        try:
            sums = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    chunk_tokens=self.args.loss_chunk_tokens)
            aux = stats.pop_aux_loss()
            total, aux_sum = sums.lm, 0.0
            if aux is not None and weight > 0:
                total = total + weight * sums.tokens * aux
                aux_sum = aux.item() * sums.tokens
            total.backward()
        finally:
            stats.valid = None
        return torch.tensor([sums.tokens, sums.lm.item(), 0.0, aux_sum], dtype=torch.float64)

    def extra_metrics(self) -> dict:
        return self.mixtures.stats.metrics()

    def eval_mode_names(self) -> list[str]:
        return [ROUTED_EVAL_MODE]

    def set_eval_mode(self, mode: str) -> None:
        """The learned routers route evaluation as they route training."""

    def eval_routing(self, rows: list[int]):
        return contextlib.nullcontext()

    def evaluate(self) -> dict:
        return Trainer.evaluate(self)

    def export(self) -> dict:
        return export_with_mixtures(self.model, self.mixtures, self.output_dir, self.tokenizer)
