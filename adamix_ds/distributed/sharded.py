"""The one way this project reads or writes a weight that ZeRO-3 may have partitioned."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 manages (it carries a ds_id)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when this rank holds only its partition."""
    return param.ds_numel if is_partitioned(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Inside the block every parameter is whole; writes by `modifier_rank` are re-partitioned after it.

    A no-op for ordinary parameters, so the same code serves one process and a ZeRO-3 job.
    """
    params = list(params)
    sharded = [p for p in params if is_partitioned(p)]
    if sharded:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # A weight the ZeRO-3 coordinator already holds whole (its module ran and still counts it active) is
        # used as it is: gathering it again would free it under the coordinator at the end of the block.
        sharded = [p for p in sharded if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not sharded:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank):
        yield
