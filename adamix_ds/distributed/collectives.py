"""Every collective of the trainer: process group, seed broadcast, gradient and statistic all-reduces,
route digests and replica checks. The mixture math elsewhere is plain single-process PyTorch."""

from __future__ import annotations

import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

DEFAULT_BUCKET_NUMEL = 50_000_000
DEFAULT_MASTER_PORT = 29500


def init_process_group(timeout_s: float = 1800.0) -> None:
    """Join (or form) the process group: deepspeed launcher, torchrun, SLURM-mapped variables or MPI.

    A single process without any launcher variables runs as a world of one.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    # Under mpirun, DeepSpeed's MPI discovery sets MASTER_PORT to this value: honour the user's, so that two
    # jobs on one host do not meet on the default port.
    port = int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    deepspeed.init_distributed(auto_mpi_discovery=True, verbose=False, distributed_port=port,
                               timeout=datetime.timedelta(seconds=timeout_s))
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank())  # object collectives use the current device (NCCL)


def setup_rank_logging() -> None:
    """Rank 0 logs at INFO; other ranks only warnings and errors."""
    logging.basicConfig(
        level=logging.INFO if is_main() else logging.WARNING, stream=sys.stdout, force=True,
        format=f"%(asctime)s [rank{rank()}] %(levelname)s %(message)s",
    )


def free_port() -> int:
    """A TCP port on this host that nothing listens on now (for a launcher's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _device() -> torch.device:
    """Where collectives' tensors live: the accelerator for NCCL, the CPU for gloo."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(local_rank()))


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank `src`'s integer on every rank (the routing seed: one route for all ranks)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.broadcast(t, src=src)
    return int(t.item())


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite `tensors` with rank `src`'s values (identical replicas from the first step)."""
    if world_size() == 1:
        return
    for t in tensors:
        buffer = t.data.to(_device())
        dist.broadcast(buffer, src=src)
        t.data.copy_(buffer)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a small statistics vector (token counts, loss sums)."""
    if world_size() > 1:
        values = values.to(_device())
        dist.all_reduce(values)
    return values


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
    """Sum the gradients of replicated parameters over ranks, a flat bucket at a time (not one call per tensor).

    With data-dependent routing a parameter may have a gradient on one rank and none on another (a sparse
    expert no token of this rank chose); ranks first agree on which gradients exist, and a missing one
    becomes zeros, so every rank reduces the same buckets. A gradient absent on every rank stays None.
    """
    if world_size() == 1:
        return
    present = all_reduce_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32))
    for param, count in zip(params, present.tolist()):
        if count and param.grad is None:
            param.grad = torch.zeros_like(param)
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for grad in (p.grad for p in params if p.grad is not None):
        if buckets[-1] and size + grad.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.numel()
    for bucket in buckets:
        if not bucket:
            continue
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat)
        for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(reduced)


def all_gather_ints(value: int) -> list[int]:
    """Every rank's integer, in rank order."""
    if world_size() == 1:
        return [value]
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def all_gather_objects(value) -> list:
    """Every rank's picklable `value`, in rank order (small things only: error messages, flags)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def tensor_digest(tensors) -> int:
    """A 63-bit digest of the exact bytes of `tensors` (in order)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_replicas_agree(tensors, what: str) -> None:
    """Raise on every rank if the replicated `tensors` differ between ranks."""
    digests = all_gather_ints(tensor_digest(tensors))
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what} differ between ranks (digests by rank: {digests})")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def destroy_process_group() -> None:
    """Leave the group cleanly (MPI reports an abort otherwise)."""
    if dist.is_initialized():
        shm_buffers = _cpu_shm_buffers()
        dist.destroy_process_group()
        for path in shm_buffers:
            path.unlink(missing_ok=True)


def _cpu_shm_buffers() -> list:
    """This rank's all-reduce buffers of DeepSpeed's CPU shared-memory op (/dev/shm, about 70 MB a rank).

    DeepSpeed creates them when the group forms on a CPU and never removes them, so every CPU job would
    leave its buffers in memory until reboot; the mappings stay valid for peers after the name is gone.
    """
    from pathlib import Path

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port or not Path("/dev/shm").is_dir():
        return []
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank()}"))
