"""The distributed layer: the process group and every collective (collectives.py), the one way to touch a weight
ZeRO-3 may have partitioned (sharded.py), the frozen base under ZeRO-3 (sharded_base.py) and the DeepSpeed config
(ds_config.py). `adamix_ds.distributed.rank()` and the other process-group calls are collectives.py's."""

from .collectives import (
    all_gather_ints,
    all_gather_objects,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    broadcast_int,
    broadcast_tensors,
    check_replicas_agree,
    destroy_process_group,
    init_process_group,
    is_main,
    local_rank,
    rank,
    setup_rank_logging,
    tensor_digest,
    world_size,
)

__all__ = [
    "all_gather_ints", "all_gather_objects", "all_reduce_gradients", "all_reduce_sum", "barrier", "broadcast_int",
    "broadcast_tensors", "check_replicas_agree", "destroy_process_group", "init_process_group", "is_main",
    "local_rank", "rank", "setup_rank_logging", "tensor_digest", "world_size",
]
