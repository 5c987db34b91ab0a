"""Training the mixtures beside a frozen (ZeRO-3 partitioned) base.

One optimizer step, on every rank:
  1. route: the router's step is set; every expert choice derives from (broadcast seed, step).
  2. forward/backward per micro-batch: loss SUMS over target tokens (CE, and KL when the consistency
     weight is on, from one forward of the doubled batch) are back-propagated into the replicated
     mixtures; gradients accumulate across micro-batches.
  3. one all-reduce of the statistics (target tokens, loss sums) and bucketed all-reduces of the
     gradients; gradients are divided by the global token count, so the update is that of the token
     mean over the whole global batch, whatever the split into ranks and micro-batches.
  4. clipping, optimizer and schedule step (identical on every rank, so replicas stay identical).
"""

from __future__ import annotations

import json
import logging
import math
import time

import torch

from .. import distributed
from ..export.merged_model import merge_and_export
from ..methods.accounting import count_parameters
from ..methods.adamix.expert_diagnostics import expert_divergence, selection_counts
from ..methods.adamix.stochastic_routing import RoutePlan
from ..methods.registry import inject_mixtures
from .checkpoints import (
    TrainerState,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .losses import causal_lm_losses
from .optimization import build_optimizer, build_scheduler
from .recipe import Trainer

logger = logging.getLogger("adamix_ds")


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class MixtureTrainer(Trainer):
    """AdaMix and single-module LoRA/adapter training: replicated mixtures, torch optimizer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        torch.manual_seed(self.seed)
        self.mixtures = inject_mixtures(self.model, self.mixture_config, seed=self.seed).to(self.base.device)
        distributed.broadcast_tensors(list(self.mixtures.parameters()))
        self.parameter_count = count_parameters(self.model, self.mixtures)
        self.params = list(self.mixtures.parameters())
        self.optimizer = build_optimizer(self.params, self.ds_config["optimizer"])
        self.scheduler = build_scheduler(self.optimizer, self.ds_config.get("scheduler"))
        self.max_grad_norm = float(self.ds_config["gradient_clipping"])
        self.nonfinite_in_a_row = 0
        self.route_log = None
        self.setup_routing()

    def setup_routing(self) -> None:
        """AdaMix: route recording for --check_routes_every and --save_routes."""
        if self.args.check_routes_every > 0 or self.args.save_routes:
            self.mixtures.router.record = []
        if self.args.save_routes:
            route_dir = self.output_dir / "routes"
            route_dir.mkdir(parents=True, exist_ok=True)
            self.route_log = open(route_dir / f"rank-{distributed.rank()}.jsonl", "a")

    def micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns (target tokens, CE sum, KL sum, aux-loss sum)."""
        args, router = self.args, self.mixtures.router
        router.step = self.step
        consistency = args.consistency_weight > 0
        sums = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                router=router, consistency=consistency, chunk_tokens=args.loss_chunk_tokens)
        total = sums.lm + args.consistency_weight * sums.kl if consistency else sums.lm
        total.backward()
        return torch.tensor([sums.tokens, sums.lm.item(), sums.kl.item() if consistency else 0.0, 0.0],
                            dtype=torch.float64)

    def train_step(self) -> dict:
        """One optimizer step over the global batch (see the module docstring)."""
        args = self.args
        self.seed_step()
        self.model.train()
        start = time.perf_counter()
        stats = torch.zeros(4, dtype=torch.float64)
        for micro in range(self.plan.accumulation):
            stats += self.micro_step(self.batch(self.step_rows(micro), self.train_data))
        stats = distributed.all_reduce_sum(stats).cpu()
        distributed.all_reduce_gradients(self.params)
        tokens = max(stats[0].item(), 1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        ).item()
        if args.check_routes_every > 0 and self.step % args.check_routes_every == 0:
            self._check_routes()
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(grad_norm) and bool(torch.isfinite(stats).all())
        if finite:
            self.nonfinite_in_a_row = 0
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self._skip_nonfinite()
        self.optimizer.zero_grad(set_to_none=True)
        self._flush_routes()
        elapsed = time.perf_counter() - start
        lm_loss, kl, aux = stats[1].item() / tokens, stats[2].item() / tokens, stats[3].item() / tokens
        return {
            "train/loss": lm_loss + args.consistency_weight * kl + self.mixture_config.aux_weight * aux,
            "train/lm_loss": lm_loss,
            **({} if self.mixture_config.is_routed else {"train/consistency_loss": kl}),
            **({"train/aux_loss": aux} if self.mixture_config.aux_weight > 0 else {}),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "perf/step_time_s": elapsed,
            "perf/tokens_per_s": stats[0].item() / elapsed,
            "train/skipped": 0.0 if finite else 1.0,
        }

    def _skip_nonfinite(self) -> None:
        """A non-finite loss or gradient (the same on every rank, after the all-reduce): no update; stop after
        --max_nonfinite_steps in a row, so NaN never reaches the weights or a checkpoint."""
        self.nonfinite_in_a_row += 1
        limit = self.args.max_nonfinite_steps
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, limit %d)",
                       self.step + 1, self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteTraining(f"stopping at step {self.step + 1}: {self.nonfinite_in_a_row} non-finite steps "
                                    f"in a row (--max_nonfinite_steps {limit}); the last checkpoint is intact")

    def _check_routes(self) -> None:
        """Compare a digest of this step's routes across ranks; stop naming the step if they differ."""
        digests = distributed.all_gather_ints(RoutePlan(self.step, list(self.mixtures.router.record)).digest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"routes diverged between ranks at step {self.step} (digests by rank: {digests})")

    def _flush_routes(self) -> None:
        record = getattr(getattr(self.mixtures, "router", None), "record", None)
        if record is None:
            return
        if self.route_log is not None:
            self.route_log.writelines(json.dumps(r) + "\n" for r in record)
            self.route_log.flush()
        record.clear()

    def extra_metrics(self) -> dict:
        return {**selection_counts(self.mixtures), **expert_divergence(self.mixtures)}

    def set_eval_mode(self, mode: str) -> None:
        self.mixtures.router.set_eval_mode(mode)

    def eval_routing(self, rows: list[int]):
        """Random-mode evaluation routes each example by its index in the eval set (any batching, any ranks)."""
        return self.mixtures.router.keyed_rows(rows)

    def eval_sums(self, batch: dict, rows: list[int]) -> tuple[int, float]:
        with self.eval_routing(rows):
            out = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                   chunk_tokens=self.args.loss_chunk_tokens)
        return out.tokens, out.lm.item()

    def evaluate(self) -> dict:
        saved = self.mixtures.router.eval_mode
        try:
            return super().evaluate()
        finally:
            self.mixtures.router.set_eval_mode(saved)

    def save(self) -> None:
        if distributed.is_main():
            state = TrainerState(step=self.step, routing_seed=self.seed,
                                 consumed_examples=self.step * self.plan.global_batch)
            path = save_checkpoint(self.output_dir, self.mixtures, self.optimizer, self.scheduler, state,
                                   self.args.save_total_limit)
            logger.info("saved checkpoint %s", path)
        distributed.barrier()

    def resume(self) -> None:
        path = find_resume_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "auto":
                logger.info("no checkpoint under %s; starting from step 0", self.output_dir)
            return
        state = load_checkpoint(path, self.mixtures, self.optimizer, self.scheduler)
        state.check_continues(path, self.seed, self.plan.global_batch)
        self.step = state.step
        logger.info("resumed from %s at step %d", path, self.step)

    def _replicated_state(self) -> list[torch.Tensor]:
        """Mixture weights and every optimizer-state tensor: identical on all ranks by design."""
        tensors = [p for _, p in self.mixtures.named_tensors()]
        for param in self.params:
            tensors.extend(torch.as_tensor(v) for _, v in sorted(self.optimizer.state[param].items()))
        return tensors

    def verify(self) -> None:
        distributed.check_replicas_agree(self._replicated_state(), "mixture weights or optimizer states")

    def export(self) -> dict:
        return merge_and_export(self.model, self.mixtures, self.output_dir, self.tokenizer,
                                self.model_args.model_name_or_path)

    def close(self) -> None:
        super().close()
        if self.route_log is not None:
            self.route_log.close()
