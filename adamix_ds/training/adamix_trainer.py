"""Training AdaMix (and the single-module LoRA and adapter baselines) on the replicated step.

What the family adds to ReplicatedTrainer: every expert choice derives from (broadcast seed, step), set
on the stochastic router before each micro-batch; with a consistency weight the micro-batch runs as one
forward of the doubled batch under two routes (AdaMix, Eq. 4); routes can be compared across ranks and
written out; evaluation runs each --eval_modes routing.
"""

from __future__ import annotations

import contextlib
import json

import torch

from .. import distributed
from ..config import EVAL_MODES
from ..methods.adamix.expert_diagnostics import expert_divergence, selection_counts
from ..methods.adamix.stochastic_routing import RoutePlan
from .losses import causal_lm_losses
from .replicated_trainer import ReplicatedTrainer


class AdaMixTrainer(ReplicatedTrainer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.router = self.mixtures.router
        self.route_log = None
        if self.args.check_routes_every > 0 or self.args.save_routes:
            self.router.record = []
        if self.args.save_routes:
            route_dir = self.output_dir / "routes"
            route_dir.mkdir(parents=True, exist_ok=True)
            self.route_log = open(route_dir / f"rank-{distributed.rank()}.jsonl", "a")

    def micro_step(self, batch: dict) -> torch.Tensor:
        """CE sum (+ consistency weight x symmetric-KL sum, from one forward of the doubled batch)."""
        args = self.args
        self.router.step = self.step
        consistency = args.consistency_weight > 0
        sums = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                router=self.router, consistency=consistency, chunk_tokens=args.loss_chunk_tokens,
                                label_smoothing=args.label_smoothing_factor)
        total = sums.lm + args.consistency_weight * sums.kl if consistency else sums.lm
        total.backward()
        return torch.tensor([sums.tokens, sums.lm.item(), sums.kl.item() if consistency else 0.0, 0.0],
                            dtype=torch.float64)

    def step_metrics(self, lm: float, kl: float, aux: float) -> dict:
        return {"train/loss": lm + self.args.consistency_weight * kl, "train/lm_loss": lm,
                "train/consistency_loss": kl}

    def before_update(self) -> None:
        every = self.args.check_routes_every
        if every > 0 and self.step % every == 0:
            self._check_routes()

    def after_update(self) -> None:
        self._flush_routes()

    def _check_routes(self) -> None:
        """Compare a digest of this step's routes across ranks; stop naming the step if they differ."""
        digests = distributed.all_gather_ints(RoutePlan(self.step, list(self.router.record)).digest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"routes diverged between ranks at step {self.step} (digests by rank: {digests})")

    def _flush_routes(self) -> None:
        record = self.router.record
        if record is None:
            return
        if self.route_log is not None:
            self.route_log.writelines(json.dumps(r) + "\n" for r in record)
            self.route_log.flush()
        record.clear()

    def extra_metrics(self) -> dict:
        return {**selection_counts(self.mixtures), **expert_divergence(self.mixtures)}

    def eval_mode_names(self) -> list[str]:
        return self.eval_modes

    def eval_sums(self, batch: dict, rows: list[int], mode: str) -> tuple[int, float]:
        with self.serving(mode, rows):
            out = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                   chunk_tokens=self.args.loss_chunk_tokens)
        return out.tokens, out.lm.item()

    @contextlib.contextmanager
    def serving(self, mode: str, rows: list[int]):
        """Random mode routes each example by its index in the eval set (any batching, any ranks)."""
        if mode not in EVAL_MODES:
            with super().serving(mode, rows):
                yield
            return
        saved = self.router.eval_mode
        self.router.set_eval_mode(mode)
        try:
            with self.router.keyed_rows(rows):
                yield
        finally:
            self.router.set_eval_mode(saved)

    def close(self) -> None:
        super().close()
        if self.route_log is not None:
            self.route_log.close()
