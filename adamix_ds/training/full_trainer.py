"""--method full: every base weight trained, the upper baseline, in a standard DeepSpeed engine.

Here ZeRO-3 partitions the weights, their fp32 masters and the optimizer state, as DeepSpeed does for
any model. The optimizer and schedule are the same ones the mixtures use (optimization.py), handed
to the engine as client objects. The step is normalised to the token mean over the global batch:
the sampler tells every rank the target-token count of the whole step without communication, and
each micro-batch's loss sum is scaled so that DeepSpeed's division by accumulation steps and by
ranks leaves sum / global tokens.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from .. import distributed
from ..data.labels import IGNORE_INDEX
from ..distributed.sharded import full_numel
from ..export.merged_model import write_merged_model
from ..methods.accounting import ParameterCount
from .optimization import build_optimizer, build_scheduler
from .trainer import Trainer

logger = logging.getLogger("adamix_ds")


def logits_ce_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[int, torch.Tensor]:
    """(target tokens, summed next-token cross-entropy) from full logits (B, T, V) and labels (B, T)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum", label_smoothing=label_smoothing)
    return int(keep.sum()), ce


class FullTrainer(Trainer):
    trainable_base = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import deepspeed

        total = sum(full_numel(p) for p in self.model.parameters())
        self.parameter_count = ParameterCount(base=total, trained=total, served=total)
        logger.info(self.parameter_count.summary())
        optimizer = build_optimizer(self.model.parameters(), self.ds_config["optimizer"])
        scheduler = build_scheduler(optimizer, self.ds_config.get("scheduler"))
        engine_config = {k: v for k, v in self.ds_config.items() if k not in ("optimizer", "scheduler", "tensorboard")}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=engine_config,
        )

    def _global_tokens(self) -> int:
        """Target tokens of the whole step, over all ranks and micro-batches (known from the sampler)."""
        return sum(
            self.train_data[i]["targets"]
            for micro in range(self.plan.accumulation)
            for rank in range(self.plan.world_size)
            for i in self.sampler.rows(self.step, micro, rank)
        )

    def train_step(self) -> dict:
        self.seed_step()
        self.engine.train()
        start = time.perf_counter()
        scale = self.plan.accumulation * self.plan.world_size / max(self._global_tokens(), 1)
        stats = torch.zeros(2, dtype=torch.float64)
        lr = self.optimizer.param_groups[0]["lr"]
        for micro in range(self.plan.accumulation):
            batch = self.batch(self.step_rows(micro), self.train_data)
            logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tokens, ce = logits_ce_sum(logits, batch["labels"], self.args.label_smoothing_factor)
            self.engine.backward(ce * scale)
            self.engine.step()
            stats += torch.tensor([tokens, ce.item()], dtype=torch.float64)
        stats = distributed.all_reduce_sum(stats).cpu()
        elapsed = time.perf_counter() - start
        loss = stats[1].item() / max(stats[0].item(), 1.0)
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "train/loss": loss,
            "train/lm_loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "perf/step_time_s": elapsed,
            "perf/tokens_per_s": stats[0].item() / elapsed,
        }

    def eval_mode_names(self) -> list[str]:
        return ["model"]

    def eval_sums(self, batch: dict, rows: list[int], mode: str) -> tuple[int, float]:
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tokens, ce = logits_ce_sum(logits, batch["labels"])
        return tokens, ce.item()

    def collective_checkpoint_bytes(self) -> int:
        """This rank's share of the weights, their fp32 masters and AdamW's two fp32 moments."""
        total = sum(full_numel(p) * (p.element_size() + 12) for p in self.model.parameters())
        return total // distributed.world_size()

    def write_checkpoint(self, directory: Path) -> dict:
        """DeepSpeed's own checkpoint: every rank writes its partition of weights, masters and optimizer state."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False)
        return {}

    def load_checkpoint(self, path: Path, record: dict) -> None:
        self.engine.load_checkpoint(str(path.parent), tag=path.name)

    def export(self) -> dict:
        directory = self.output_dir / "merged" / "model"
        return {"model": str(write_merged_model(self.model, {}, directory, self.tokenizer))}
