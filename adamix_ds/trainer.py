"""The training recipe, top to bottom: set up, train, evaluate, checkpoint, merge.

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
from dataclasses import asdict
from pathlib import Path

import torch

from . import distributed
from .accounting import count_parameters
from .arguments import DataArguments, ModelArguments, TrainArguments
from .config import EVAL_MODES, ConfigError, MixtureConfig
from .consistency import causal_lm_losses
from .data import StepSampler, collate, load_tokenizer, train_eval_datasets
from .ds_config import BatchPlan, load_ds_config, resolve_ds_config
from .merged_export import merge_and_export
from .mixture_set import MixtureSet
from .optimization import build_optimizer, build_scheduler
from .routing import counter_hash
from .sharded_base import load_base
from .train_checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint, save_checkpoint

logger = logging.getLogger("adamix_ds")


def total_steps(args: TrainArguments, num_examples: int, plan: BatchPlan) -> int:
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.floor(args.num_train_epochs * (num_examples // plan.global_batch)))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of dropout at one step on one rank: resumed runs draw the same masks."""
    return counter_hash(seed, step, rank) & ((1 << 63) - 1)


class Trainer:
    """Holds what one run builds; `run()` executes it. Built and run identically on every rank."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, mixture_config: MixtureConfig,
                 args: TrainArguments) -> None:
        self.model_args, self.data_args, self.mixture_config, self.args = model_args, data_args, mixture_config, args
        self.output_dir = Path(args.output_dir)
        self.eval_modes = [m.strip() for m in args.eval_modes.split(",") if m.strip()]
        unknown = [m for m in self.eval_modes if m not in EVAL_MODES]
        if unknown:
            raise ConfigError(f"--eval_modes={args.eval_modes!r}: {unknown} not in {', '.join(EVAL_MODES)}")

        self.routing_seed = distributed.broadcast_int(args.seed)
        raw_ds_config = load_ds_config(args.deepspeed)
        self.tokenizer = load_tokenizer(model_args)
        self.train_data, self.eval_data = train_eval_datasets(data_args, self.tokenizer, self.routing_seed)
        world = distributed.world_size()
        self.ds_config, self.plan = resolve_ds_config(
            raw_ds_config, args, world, lambda plan: total_steps(args, len(self.train_data), plan)
        )
        self.total_steps = total_steps(args, len(self.train_data), self.plan)
        self.sampler = StepSampler(len(self.train_data), self.plan, self.routing_seed)
        logger.info(self.plan.describe(data_args.max_seq_length))
        logger.info("%d training examples, %d steps (%d per epoch)", len(self.train_data), self.total_steps,
                    self.sampler.steps_per_epoch)

        self.base = load_base(model_args, self.ds_config, vocab_size=len(self.tokenizer), seed=args.seed)
        self.model = self.base.model
        torch.manual_seed(self.routing_seed)
        self.mixtures = MixtureSet.inject(self.model, mixture_config, seed=self.routing_seed).to(self.base.device)
        distributed.broadcast_tensors(list(self.mixtures.parameters()))
        self.parameter_count = count_parameters(self.model, self.mixtures)
        self.params = list(self.mixtures.parameters())
        self.optimizer = build_optimizer(self.params, self.ds_config["optimizer"])
        self.scheduler = build_scheduler(self.optimizer, self.ds_config.get("scheduler"))
        self.max_grad_norm = float(self.ds_config["gradient_clipping"])
        self.step = 0
        self.writer = self._tensorboard()
        self.history: list[dict] = []
        if args.check_routes_every > 0 or args.save_routes:
            self.mixtures.router.record = []
        self.route_log = None
        if args.save_routes:
            route_dir = self.output_dir / "routes"
            route_dir.mkdir(parents=True, exist_ok=True)
            self.route_log = open(route_dir / f"rank-{distributed.rank()}.jsonl", "a")

    def _tensorboard(self):
        section = self.ds_config.get("tensorboard", {})
        if not distributed.is_main() or not section.get("enabled", True):
            return None
        from torch.utils.tensorboard import SummaryWriter

        root = Path(section.get("output_path") or self.output_dir / "tensorboard")
        return SummaryWriter(log_dir=str(root / section.get("job_name", "")))

    def resume(self) -> None:
        path = find_resume_checkpoint(self.output_dir, self.args.resume_from_checkpoint)
        if path is None:
            if self.args.resume_from_checkpoint == "auto":
                logger.info("no checkpoint under %s; starting from step 0", self.output_dir)
            return
        state = load_checkpoint(path, self.mixtures, self.optimizer, self.scheduler)
        if state.routing_seed != self.routing_seed:
            raise ConfigError(f"checkpoint {path} was trained with routing seed {state.routing_seed}, "
                              f"this run has {self.routing_seed}; pass --seed {state.routing_seed}")
        self.step = state.step
        logger.info("resumed from %s at step %d", path, self.step)

    def train_step(self) -> dict:
        """One optimizer step over the global batch (see the module docstring)."""
        args, router = self.args, self.mixtures.router
        consistency = args.consistency_weight > 0
        router.step = self.step
        torch.manual_seed(_step_seed(self.routing_seed, self.step, distributed.rank()))
        self.model.train()
        start = time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64)
        for micro in range(self.plan.accumulation):
            rows = self.sampler.rows(self.step, micro, distributed.rank())
            batch = _to_device(collate([self.train_data[i] for i in rows], self.tokenizer.pad_token_id),
                               self.base.device)
            sums = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                    router=router, consistency=consistency, chunk_tokens=args.loss_chunk_tokens)
            total = sums.lm + args.consistency_weight * sums.kl if consistency else sums.lm
            total.backward()
            stats += torch.tensor([sums.tokens, sums.lm.item(), sums.kl.item() if consistency else 0.0],
                                  dtype=torch.float64)
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
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if router.record is not None:
            if self.route_log is not None:
                self.route_log.writelines(json.dumps(r) + "\n" for r in router.record)
                self.route_log.flush()
            router.record.clear()
        elapsed = time.perf_counter() - start
        lm_loss, kl = stats[1].item() / tokens, stats[2].item() / tokens
        return {
            "train/loss": lm_loss + args.consistency_weight * kl,
            "train/lm_loss": lm_loss,
            "train/consistency_loss": kl,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "perf/step_time_s": elapsed,
            "perf/tokens_per_s": stats[0].item() / elapsed,
        }

    def _check_routes(self) -> None:
        """Compare a digest of this step's routes across ranks; stop naming the step if they differ."""
        from .routing import RoutePlan

        digest = RoutePlan(self.step, list(self.mixtures.router.record)).digest()
        digests = distributed.all_gather_ints(digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"routes diverged between ranks at step {self.step} (digests by rank: {digests})")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-mean eval loss per routing mode; the eval set is split across ranks, sums all-reduced."""
        if self.eval_data is None:
            return {}
        rank, world = distributed.rank(), distributed.world_size()
        batch_size = self.args.per_device_eval_batch_size or self.plan.micro_batch
        mine = list(range(rank, len(self.eval_data), world))
        per_rank = math.ceil(len(self.eval_data) / world)
        batches = math.ceil(per_rank / batch_size)
        router = self.mixtures.router
        saved_mode = router.eval_mode
        self.model.eval()
        metrics = {}
        for mode in self.eval_modes:
            router.set_eval_mode(mode)
            sums = torch.zeros(2, dtype=torch.float64)
            for b in range(batches):
                rows = mine[b * batch_size:(b + 1) * batch_size]
                # Under ZeRO-3 every rank must run the same number of forwards: a rank out of rows runs a
                # batch that counts no token.
                examples = [self.eval_data[i] for i in rows] or [self.eval_data[0]]
                batch = _to_device(collate(examples, self.tokenizer.pad_token_id), self.base.device)
                if not rows:
                    batch["labels"].fill_(-100)
                out = causal_lm_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                       chunk_tokens=self.args.loss_chunk_tokens)
                sums += torch.tensor([out.tokens, out.lm.item()], dtype=torch.float64)
            sums = distributed.all_reduce_sum(sums).cpu()
            loss = sums[1].item() / max(sums[0].item(), 1.0)
            metrics[f"eval/{mode}/loss"] = loss
            metrics[f"eval/{mode}/perplexity"] = math.exp(min(loss, 50.0))
        router.set_eval_mode(saved_mode)
        return metrics

    def save(self) -> None:
        if distributed.is_main():
            state = TrainerState(step=self.step, routing_seed=self.routing_seed,
                                 consumed_examples=self.step * self.plan.global_batch)
            path = save_checkpoint(self.output_dir, self.mixtures, self.optimizer, self.scheduler, state,
                                   self.args.save_total_limit)
            logger.info("saved checkpoint %s", path)
        distributed.barrier()

    def _log(self, metrics: dict) -> None:
        self.history.append({"step": self.step, **metrics})
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.step)
            self.writer.flush()
        logger.info("step %d/%d %s", self.step, self.total_steps,
                    " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))

    def run(self) -> dict:
        args = self.args
        self.resume()
        if distributed.is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
        while self.step < self.total_steps:
            metrics = self.train_step()
            self.step += 1
            if self.step % max(args.logging_steps, 1) == 0 or self.step == self.total_steps:
                self._log(metrics)
            if args.eval_steps > 0 and self.step % args.eval_steps == 0 and self.step < self.total_steps:
                self._log(self.evaluate())
            if args.save_steps > 0 and self.step % args.save_steps == 0 and self.step < self.total_steps:
                self.save()
        final = self.evaluate()
        if final:
            self._log(final)
        distributed.check_replicas_agree(self._replicated_state(), "mixture weights or optimizer states")
        self.save()
        merged = {}
        if args.merge_at_end:
            merged = merge_and_export(self.model, self.mixtures, self.output_dir, self.tokenizer,
                                      self.model_args.model_name_or_path)
            logger.info("merged outputs: %s", merged)
        summary = {"final_step": self.step, "final_eval": final, "merged": merged,
                   "parameters": self.parameter_count.to_dict()}
        self._write_run_json(summary)
        if self.writer is not None:
            self.writer.close()
        if self.route_log is not None:
            self.route_log.close()
        return summary

    def _replicated_state(self) -> list[torch.Tensor]:
        """Mixture weights and every optimizer-state tensor: identical on all ranks by design."""
        tensors = [p for _, p in self.mixtures.named_tensors()]
        for param in self.params:
            tensors.extend(torch.as_tensor(v) for _, v in sorted(self.optimizer.state[param].items()))
        return tensors

    def _partition(self) -> dict:
        """Elements of each base weight held by this rank (ceil(numel / W) under ZeRO-3)."""
        return {
            name: (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel())
            for name, p in self.model.named_parameters()
        }

    def _write_run_json(self, summary: dict) -> None:
        if not distributed.is_main():
            return
        import deepspeed
        import transformers

        from . import __version__

        record = {
            "arguments": {"model": asdict(self.model_args), "data": asdict(self.data_args),
                          "mixture": self.mixture_config.to_dict(), "train": asdict(self.args)},
            "deepspeed_config": self.ds_config,
            "batch": asdict(self.plan) | {"global_batch": self.plan.global_batch},
            "routing_seed": self.routing_seed,
            "base_partition": {"world_size": distributed.world_size(), "zero_stage": self.base.stage,
                               "rank0_numel": self._partition()},
            "versions": {"adamix_ds": __version__, "torch": torch.__version__,
                         "deepspeed": deepspeed.__version__, "transformers": transformers.__version__},
            "history": self.history,
            **summary,
        }
        (self.output_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")


def train(model_args: ModelArguments, data_args: DataArguments, mixture_config: MixtureConfig,
          args: TrainArguments) -> dict:
    """Run one training job on this rank; every rank of the job calls it."""
    distributed.init_process_group()
    distributed.setup_rank_logging()
    try:
        return Trainer(model_args, data_args, mixture_config, args).run()
    finally:
        distributed.destroy_process_group()
