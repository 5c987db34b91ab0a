"""Collectives on a real 2-process gloo group (torch.multiprocessing, no launcher): bucketed gradient
all-reduce against an explicit sum, seed broadcast, replica checks."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launching import free_port

from adamix_ds import distributed


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls = []
        original = dist.all_reduce

        def counting(tensor, *a, **k):
            calls.append(tensor.numel())
            return original(tensor, *a, **k)

        dist.all_reduce = counting
        g = torch.Generator().manual_seed(rank)
        params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 7, 3, 9, 4, 2)]
        for p in params[:4]:
            p.grad = torch.randn(p.shape, generator=g)
        if rank == 1:  # a gradient only one rank has (a sparse expert no token of rank 0 chose)
            params[4].grad = torch.randn(4, generator=g)
        local = [p.grad.clone() if p.grad is not None else torch.zeros(p.shape) for p in params[:5]]
        distributed.all_reduce_gradients(params, bucket_numel=12)
        dist.all_reduce = original
        assert params[5].grad is None  # absent on every rank: stays absent (the optimizer skips it)
        params = params[:5]
        seed = distributed.broadcast_int(1000 + rank)
        same = distributed.tensor_digest([torch.ones(3)])
        distributed.check_replicas_agree([torch.ones(3)], "ones")
        try:
            distributed.check_replicas_agree([torch.full((3,), float(rank))], "rank-valued tensors")
            diverged = None
        except RuntimeError as error:
            diverged = str(error)
        queue.put((rank, calls, [p.grad.tolist() for p in params], [t.tolist() for t in local], seed, same, diverged))
    finally:
        dist.destroy_process_group()


def test_bucketed_all_reduce_seed_broadcast_and_replica_check():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (calls0, grads0, local0, seed0, same0, div0), (calls1, grads1, local1, seed1, same1, div1) = results[0], results[1]
    # One call agrees on which of the 6 gradients exist; then 5 tensors of 5, 7, 3, 9, 4 elements in buckets
    # of at most 12: [5, 7], [3, 9], [4] -> 3 calls, not 5.
    assert calls0 == calls1 == [6, 12, 12, 4]
    for g0, g1, a, b in zip(grads0, grads1, local0, local1):
        expected = torch.tensor(a) + torch.tensor(b)
        torch.testing.assert_close(torch.tensor(g0), expected)
        torch.testing.assert_close(torch.tensor(g1), expected)
    assert seed0 == seed1 == 1000
    assert same0 == same1
    assert div0 is not None and "rank-valued tensors differ between ranks" in div0 and div1 is not None
