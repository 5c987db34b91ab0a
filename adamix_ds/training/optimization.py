"""The mixtures' optimizer and learning-rate schedule, built from the DeepSpeed config's sections.

The mixtures are replicated on every rank, so a plain torch optimizer steps them; DeepSpeed's own
schedule classes (deepspeed.runtime.lr_schedules) drive its learning rate, so the scheduler section
means exactly what it means in DeepSpeed.
"""

from __future__ import annotations

import torch
from deepspeed.runtime import lr_schedules


def build_optimizer(params, section: dict) -> torch.optim.Optimizer:
    """AdamW (also for type Adam, as DeepSpeed's adam_w_mode default does) or SGD, from resolved params."""
    kind, p = section["type"], dict(section["params"])
    if kind in ("AdamW", "Adam"):
        adam_w_mode = p.pop("adam_w_mode", True)
        cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
        return cls(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=p["weight_decay"])
    return torch.optim.SGD(params, lr=p["lr"], momentum=p.get("momentum", 0.0), weight_decay=p["weight_decay"])


def build_scheduler(optimizer: torch.optim.Optimizer, section: dict | None):
    """A DeepSpeed schedule stepped once per optimizer step, or None for a constant learning rate.

    It is stepped once here, so that schedule iteration i sets the learning rate of optimizer step i.
    """
    if section is None:
        return None
    params = dict(section["params"])
    params["warmup_num_steps"] = max(1, int(params["warmup_num_steps"]))
    params.setdefault("warmup_type", "linear")
    scheduler = getattr(lr_schedules, section["type"])(optimizer, **params)
    scheduler.step()
    return scheduler
