"""Batches: which rows each rank's micro-batch holds at each step, and how rows become tensors.

The order of examples is a function of (seed, epoch) and the position a function of the step, so
every rank knows which rows it owns at any step without communication, and a resumed run continues
at the exact example where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from ..distributed.ds_config import BatchPlan
from .labels import IGNORE_INDEX


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask and labels (-100 on padding)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class StepSampler:
    """Step s of epoch e = s // steps_per_epoch takes the next global batch of that epoch's seeded
    permutation; micro-batch m of rank r takes rows [(m * world + r) * micro, ... + micro) of it. The
    incomplete last global batch of an epoch is dropped."""

    num_examples: int
    plan: BatchPlan
    seed: int
    _epoch_order: tuple = field(default=(-1, None), repr=False)

    def __post_init__(self) -> None:
        if self.num_examples < self.plan.global_batch:
            raise ConfigError(
                f"{self.num_examples} training examples are fewer than one global batch of {self.plan.global_batch}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.plan.global_batch

    def order(self, epoch: int) -> torch.Tensor:
        if self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_order = (epoch, torch.randperm(self.num_examples, generator=generator))
        return self._epoch_order[1]

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        start = index * self.plan.global_batch + (micro * self.plan.world_size + rank) * self.plan.micro_batch
        return self.order(epoch)[start: start + self.plan.micro_batch].tolist()
