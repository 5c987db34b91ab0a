"""How an entry point's process ends (adamix_ds.cli.exit_process): a finished job exits 0 even when a gloo worker
thread still holds a collective's tensors, and ending that way still runs exit handlers, flushes output and
finalizes MPI."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from launching import REPO, free_port

# Rank 1 drops an all-reduce and then keeps the GIL (a busy loop under a long switch interval) for a second before it
# exits; rank 0 joins the all-reduce once rank 1 holds the GIL (rank 1 creates a file then), so the worker thread
# that completes the all-reduce on rank 1 has to take the GIL during the exit to free the tensor, as after a job
# whose last collective is followed at once by the exit. Both ways of exiting have run the exit handlers already
# (one of them could hand the GIL over): only the teardown differs. The groups are not destroyed:
# destroy_process_group leaves the worker threads running while anything still refers to a group (DeepSpeed does),
# and it may hand the GIL over, which would make the abort a matter of chance.
LATE_RELEASE = textwrap.dedent("""
    import atexit, os, sys, time
    import torch
    import torch.distributed as dist
    from adamix_ds.cli import exit_process

    dist.init_process_group("gloo")
    groups = [dist.group.WORLD, dist.new_group([0, 1])]  # held elsewhere, as DeepSpeed holds its groups
    dist.barrier()
    print("job done", flush=True)
    how, holding = sys.argv[1:]
    sys.setswitchinterval(1000.0)
    if dist.get_rank() == 0:
        while not os.path.exists(holding):
            time.sleep(0.01)
    dist.all_reduce(torch.ones(1), async_op=True)
    atexit._run_exitfuncs()
    if dist.get_rank() == 1:
        open(holding, "w").close()
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:
            pass
    if how == "exit_process":
        exit_process(0)
    sys.exit(0)
""")


def _two_ranks(script, how):
    holding = script.parent / f"rank-1-holds-the-gil-{how}"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), how, str(holding)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    return [p.returncode for p in procs], outputs


def test_a_job_that_ends_while_gloo_frees_a_collective_exits_cleanly(tmp_path):
    script = tmp_path / "late_release.py"
    script.write_text(LATE_RELEASE)
    codes, outputs = _two_ranks(script, "sys.exit")
    assert all("job done" in out for out in outputs), outputs
    assert -signal.SIGABRT in codes and "terminate called without an active exception" in "".join(outputs), (
        f"the interpreter teardown no longer aborts here (exit codes {codes}); exit_process may be unnecessary")
    codes, outputs = _two_ranks(script, "exit_process")
    assert codes == [0, 0], outputs
    assert all("job done" in out and "terminate" not in out for out in outputs), outputs


def test_exit_process_joins_threads_runs_exit_handlers_flushes_output_and_finalizes_mpi(tmp_path):
    pytest.importorskip("mpi4py")
    marker, finalized, joined = tmp_path / "atexit-ran", tmp_path / "mpi-finalized", tmp_path / "thread-done"
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from mpi4py import MPI
        from adamix_ds.cli import exit_process

        threading.Thread(target=lambda: (time.sleep(0.5), open({str(joined)!r}, "w").close())).start()
        atexit.register(lambda: open({str(marker)!r}, "w").close())
        # MPI_Finalize deletes COMM_SELF's attributes first, so this callback runs exactly when MPI is finalized.
        key = MPI.Comm.Create_keyval(delete_fn=lambda *_: open({str(finalized)!r}, "w").close())
        MPI.COMM_SELF.Set_attr(key, 1)
        sys.stdout.write("buffered, no newline")
        sys.stderr.write("also buffered")
        exit_process(3)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline" and proc.stderr.endswith("also buffered")
    assert marker.exists() and finalized.exists() and joined.exists()
