"""Two hosts that share only a network (network namespaces joined by a veth pair, see network_hosts.py),
one rank each, launched as a multi-node user does: DeepSpeed's launcher once per node without ssh
(--hostfile --no_ssh --node_rank --master_addr --master_port), gloo bound to the host's interface.
The output directory is on a disk both hosts see, as on a cluster's shared file system."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
import torch
from launching import REPO, cpu_env, free_port, run_entry, train_losses, wait_for
from network_hosts import TwoHosts, kill_all_in, processes_in
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adamix_ds import fold_into_base, load_mixtures, merge_experts

STEPS = 4


def _train_args(ws, out, seed, extra=()):
    return ["--deepspeed", "ds_configs/zero3.json", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data),
            "--output_dir", str(out), "--max_seq_length", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "5e-3", "--warmup_steps", "1", "--method", "adamix-lora", "--num_experts", "4",
            "--share", "none", "--consistency_weight", "1.0", "--per_device_train_batch_size", "2",
            "--save_steps", "2", "--save_total_limit", "5", "--seed", str(seed), *extra]


def _launch(hosts, hostfile, port, args_of_host):
    """Start the job on both hosts (node 0 is the master); returns the launcher processes.

    Their output goes to unnamed files, not pipes: a job left running while nobody reads its output
    would otherwise block on a full pipe (64 KiB) instead of in the collective a test waits for.
    """
    procs = []
    for node, host in enumerate(hosts):
        argv = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                "--master_addr", hosts[0].address, "--master_port", str(port),
                str(REPO / "launch" / "train.py"), *args_of_host(node)]
        env = cpu_env(GLOO_SOCKET_IFNAME=host.interface)
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(host.command(argv), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        proc.log = log
        procs.append(proc)
    return procs


def _output(proc) -> str:
    """What the launcher wrote so far. Read at an offset: the launcher shares the file's position."""
    fd = proc.log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def _training(procs) -> bool:
    """Host 0 has logged a training step (both ranks are in the training loop); neither launcher has ended."""
    assert all(p.poll() is None for p in procs), "the job ended before the test acted on it"
    return "train/loss=" in _output(procs[0])


def _finish(procs, timeout=300):
    outputs = []
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("the two-host job did not finish in time") from None
        outputs.append(_output(proc))
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-6000:]
    return outputs


def _stop(procs, hosts):
    """End what is left of a job on both hosts: launchers and the ranks they leave behind."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)
    for host in hosts:
        kill_all_in(host)


@pytest.fixture(scope="module")
def hosts():
    with TwoHosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def hostfile(hosts, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostfile") / "hostfile"
    path.write_text("".join(f"{h.hostname} slots=1\n" for h in hosts))
    return path


@pytest.fixture(scope="module")
def runs(hosts, hostfile, workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    out = {name: root / name for name in ("two_hosts", "one_host", "resumed")}
    # Host 1 is given another --seed: rank 0's seed must reach it (routes and data order follow rank 0).
    _finish(_launch(hosts, hostfile, free_port(), lambda node: _train_args(
        workspace, out["two_hosts"], seed=7 + node, extra=("--save_routes", "--check_routes_every", "1"))))
    run_entry("train.py", _train_args(workspace, out["one_host"], seed=7, extra=("--merge_at_end", "false")), ranks=2)
    shutil.copytree(out["two_hosts"] / "checkpoints" / "step-2", out["resumed"] / "checkpoints" / "step-2")
    _finish(_launch(hosts, hostfile, free_port(), lambda node: _train_args(
        workspace, out["resumed"], seed=7, extra=("--resume_from_checkpoint", "auto", "--merge_at_end", "false"))))
    return out


def test_two_hosts_train_as_two_ranks_of_one_host(runs):
    two, one = train_losses(runs["two_hosts"]), train_losses(runs["one_host"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    a = load_file(str(runs["two_hosts"] / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))
    b = load_file(str(runs["one_host"] / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_routes_are_identical_on_both_hosts(runs):
    routes = runs["two_hosts"] / "routes"
    host0, host1 = (routes / "rank-0.jsonl").read_text(), (routes / "rank-1.jsonl").read_text()
    assert host0 == host1 and len(host0.splitlines()) == STEPS * 2 * 2 * 4  # steps x passes x sides x slots
    record = json.loads((runs["two_hosts"] / "run.json").read_text())
    assert record["routing_seed"] == 7
    # Host 1 was started with --seed 8: its routes are those of rank 0's seed 7, recomputed here independently.
    from adamix_ds.methods.adamix.stochastic_routing import DOWN, UP, train_expert

    mixture = record["arguments"]["mixture"]
    per_side = {side: 1 if mixture["share"] == shared else mixture["num_experts"] for side, shared in ((DOWN, "down"),
                                                                                                       (UP, "up"))}
    taken = [json.loads(line) for line in host1.splitlines()]

    def expected(seed):
        return [train_expert(seed, step, p, slot, side, per_side[side]) for step, p, slot, side, _ in taken]

    assert [e for *_, e in taken] == expected(7) != expected(8)


def test_both_hosts_write_the_merged_checkpoint_and_it_loads_plainly(runs, workspace):
    model_dir = runs["two_hosts"] / "merged" / "model"
    writers = []
    for shard in sorted(model_dir.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            writers.append(handle.metadata()["written_by"])
    assert writers == ["rank 0 of 2 on testhost0", "rank 1 of 2 on testhost1"]
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(workspace.base).eval()
    mixtures = load_mixtures(base, runs["two_hosts"] / "checkpoints" / f"step-{STEPS}", attach=False)
    fold_into_base(base, merge_experts(mixtures))
    ids = torch.tensor([[1, 17, 42, 99, 5, 23]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)


def test_resume_auto_continues_on_both_hosts(runs):
    full = load_file(str(runs["two_hosts"] / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))
    resumed = load_file(str(runs["resumed"] / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)
    assert sorted(train_losses(runs["resumed"])) == [3, 4]


KILLED_HOST_BOUND_S = 10
"""docs/clusters.md's bound for a killed rank on one host ending the other (measured 4-5 s)."""


def test_killing_the_rank_on_one_host_ends_the_job_on_the_other(hosts, hostfile, workspace, tmp_path):
    procs = _launch(hosts, hostfile, free_port(), lambda node: _train_args(
        workspace, tmp_path / "killed", seed=7, extra=("--max_steps", "100000", "--save_steps", "0")))
    try:
        wait_for(lambda: _training(procs), 240, "a training step on host 0", lambda: _output(procs[0])[-4000:])
        victims = processes_in(hosts[1], "--local_rank")
        assert victims, "no rank on host 1"
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        procs[0].wait(timeout=60)
        ended_after = time.monotonic() - killed_at
        survivors = processes_in(hosts[0], "--local_rank")  # before the clean-up below kills whatever is left
    finally:
        _stop(procs, hosts)
    print(f"host 0 ended {ended_after:.1f} s after the kill on host 1")
    assert procs[0].returncode != 0 and ended_after < KILLED_HOST_BOUND_S
    assert not survivors


def test_a_vanished_host_ends_the_job_after_the_ddp_timeout(hosts, hostfile, workspace, tmp_path):
    """A host that drops off the network closes no connection; the collective timeout ends the survivor."""
    procs = _launch(hosts, hostfile, free_port(), lambda node: _train_args(
        workspace, tmp_path / "vanished", seed=7, extra=("--max_steps", "100000", "--save_steps", "0",
                                                         "--ddp_timeout", "20")))
    try:
        wait_for(lambda: _training(procs), 240, "a training step on host 0", lambda: _output(procs[0])[-4000:])
        subprocess.run(["ip", "-n", hosts[1].namespace, "link", "set", hosts[1].interface, "down"], check=True,
                       timeout=60)
        gone_at = time.monotonic()
        procs[0].wait(timeout=90)
        ended_after = time.monotonic() - gone_at
    finally:
        subprocess.run(["ip", "-n", hosts[1].namespace, "link", "set", hosts[1].interface, "up"], timeout=60)
        _stop(procs, hosts)
    print(f"host 0 ended {ended_after:.1f} s after host 1 vanished")
    assert procs[0].returncode != 0 and 20 <= ended_after < 60  # the 20 s --ddp_timeout, not something sooner
