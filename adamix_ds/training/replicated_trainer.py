"""Training replicated mixtures beside a frozen (ZeRO-3 partitioned) base: what AdaMix and the routed methods share.

One optimizer step, on every rank:
  1. forward/backward per micro-batch (`micro_step`, the family's): loss SUMS over target tokens are
     back-propagated into the replicated mixtures; gradients accumulate across micro-batches.
  2. one all-reduce of the statistics (target tokens, loss sums) and bucketed all-reduces of the
     gradients; gradients are divided by the global token count, so the update is that of the token
     mean over the whole global batch, whatever the split into ranks and micro-batches.
  3. clipping, then the optimizer and schedule step (identical on every rank, so replicas stay identical);
     a step whose loss or gradient is not finite, the same on every rank after the all-reduce, is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from .. import distributed
from ..export.merged_model import export_mixtures
from ..methods.accounting import count_parameters
from ..methods.registry import inject_mixtures
from .checkpoints import load_replicated_state, write_replicated_state
from .optimization import build_optimizer, build_scheduler
from .trainer import Trainer

logger = logging.getLogger("adamix_ds")

STATISTICS = ("tokens", "lm", "kl", "aux")
"""What a micro-step returns, summed over its target tokens (kl: consistency; aux: load balancing)."""


class NonFiniteTraining(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class ReplicatedTrainer(Trainer):
    """Mixtures whole on every rank, stepped by a torch optimizer; a family provides `micro_step`, `step_metrics`,
    its evaluation and its export."""

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

    # What a family provides.
    def micro_step(self, batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its sums in the order of STATISTICS (float64)."""
        raise NotImplementedError

    def step_metrics(self, lm: float, kl: float, aux: float) -> dict:
        """train/loss and the family's parts of it, from the step's token means."""
        raise NotImplementedError

    def before_update(self) -> None:
        """Called on every rank after the gradients are reduced and before the optimizer steps."""

    def after_update(self) -> None:
        """Called on every rank once the step is done (taken or skipped)."""

    # The step.
    def train_step(self) -> dict:
        """One optimizer step over the global batch (see the module docstring)."""
        self.seed_step()
        self.model.train()
        start = time.perf_counter()
        stats = torch.zeros(len(STATISTICS), dtype=torch.float64)
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
        self.before_update()
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
        self.after_update()
        elapsed = time.perf_counter() - start
        return {
            **self.step_metrics(*(value / tokens for value in stats[1:].tolist())),
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

    # Checkpoints and the final check.
    def served_modes(self) -> list[str]:
        return ["base", *super().served_modes()]

    @contextlib.contextmanager
    def serving(self, mode: str, rows: list[int]):
        """`base`: the mixtures' hooks come off, so the model is the untrained base; other modes as evaluated."""
        if mode != "base":
            with super().serving(mode, rows):
                yield
            return
        self.mixtures.detach()
        try:
            yield
        finally:
            self.mixtures.attach(self.generating_on)

    def attach_mixtures(self, model) -> None:
        self.mixtures.detach()
        self.mixtures.attach(model)

    def write_checkpoint(self, directory: Path) -> dict:
        return write_replicated_state(directory, self.mixtures, self.optimizer, self.scheduler)

    def load_checkpoint(self, path: Path, record: dict) -> None:
        load_replicated_state(path, record, self.mixtures, self.optimizer, self.scheduler)

    def _replicated_state(self) -> list[torch.Tensor]:
        """Mixture weights and every optimizer-state tensor: identical on all ranks by design."""
        tensors = [p for _, p in self.mixtures.named_tensors()]
        for param in self.params:
            tensors.extend(torch.as_tensor(v) for _, v in sorted(self.optimizer.state[param].items()))
        return tensors

    def verify(self) -> None:
        distributed.check_replicas_agree(self._replicated_state(), "mixture weights or optimizer states")

    def rerun_export(self) -> str:
        checkpoint = self.output_dir / "checkpoints" / f"step-{self.step}"
        model = " ".join(f"--{name} {value}" for name, value in dataclasses.asdict(self.model_args).items()
                         if value not in (None, False))
        return (f"rerun the export with launch/merge.py --checkpoint {checkpoint} --output_dir {self.output_dir} "
                f"{model} --deepspeed {self.args.deepspeed} --seed {self.args.seed}")

    def export(self) -> dict:
        """The family's export (AdaMix: the experts averaged into one module; routed: base and whole mixture)."""
        return export_mixtures(self.model, self.mixtures, self.output_dir, self.tokenizer,
                               self.model_args.model_name_or_path)
