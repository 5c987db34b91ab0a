"""Cluster operation for real on this machine: a one-node SLURM cluster running slurm/train.sbatch and
slurm/merge.sbatch with 2 tasks, and a 2-process mpirun launch through mpi4py discovery."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from launching import REPO, cpu_env, free_port, run_record, train_losses, wait_for
from safetensors.torch import load_file
from slurm_cluster import missing_binaries, node_state, single_node_cluster

TRAIN = ["--model_name_or_path", "tiny:llama", "--max_steps", "4", "--max_seq_length", "64",
         "--eval_steps", "2", "--num_samples", "1", "--per_device_train_batch_size", "2", "--logging_steps", "1"]


def _job_state(env: dict, job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=60).stdout


def _ended(env: dict, job: str, release: bool = False) -> str:
    """The job's state once it has ended, else ''. With `release`, a job held for its begin time is let start now:
    a requeued job waits about two minutes to be eligible again, and slurmctld sets that time anew when the batch
    step's requeue finishes, which can come after a first release (an old flake: the job never re-ran). The release
    waits for the node to be idle, i.e. the killed run's batch step has reported and its epilog has run: released
    before that, the old batch script's exit 143 could be booked to the job (another flake: FAILED, NonZeroExitCode)."""
    state = _job_state(env, job)
    if release and re.search(r"JobState=PENDING Reason=BeginTime", state) and node_state(env) == "idle":
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True, timeout=60)
    return state if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT)", state) else ""


def _slurmctld_log(cluster: Path) -> str:
    log = cluster / "log" / "slurmctld.log"
    return log.read_text(errors="replace")[-3000:] if log.exists() else "no slurmctld log"


def _sbatch(env, script, tmp_path, args):
    proc = subprocess.run(
        ["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
         f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", str(REPO / "slurm" / script), *args],
        env=env, capture_output=True, text=True, timeout=600,
    )
    job = proc.stdout.strip().split(";")[0]
    log = next(tmp_path.glob(f"slurm-{job}.out"), None)
    assert proc.returncode == 0, f"{script} failed ({proc.stderr}):\n{log.read_text()[-5000:] if log else ''}"
    state = _job_state(env, job)
    assert re.search(r"JobState=COMPLETED", state), state
    return job, log.read_text()


@pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM/munge not installed ({missing_binaries()}); "
                                                     ".ci/run installs slurm-wlm and munge")
def test_slurm_train_and_merge_jobs(tmp_path):
    env_base = cpu_env(OUTPUT_ROOT=str(tmp_path / "runs"))
    with single_node_cluster(tmp_path / "cluster") as cluster_env:
        env = {**env_base, "SLURM_CONF": cluster_env["SLURM_CONF"]}
        job, log = _sbatch(env, "train.sbatch", tmp_path, TRAIN)
        out = tmp_path / "runs" / f"adamix-{job}"
        assert "2 tasks on 1 node(s)" in log
        record = run_record(out)
        assert record["base_partition"]["world_size"] == 2
        assert sorted(train_losses(out)) == [1, 2, 3, 4]
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
        assert (out / "merged" / "model" / "model.safetensors.index.json").is_file()
        merged = tmp_path / "merged"
        _sbatch(env, "merge.sbatch", tmp_path, ["--checkpoint", str(out / "checkpoints" / "step-4"),
                                                 "--model_name_or_path", "tiny:llama", "--output_dir", str(merged)])
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        ours, theirs = load_file(str(merged / "merged" / "model" / shard)), load_file(str(out / "merged" / "model" / shard))
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no MPI launcher (pip install mpich mpi4py)")
def test_mpirun_launch(tmp_path):
    proc = subprocess.run(
        ["mpiexec", "-n", "2", "python", str(REPO / "launch" / "train.py"), *TRAIN, "--output_dir", str(tmp_path)],
        cwd=REPO, env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert run_record(tmp_path)["base_partition"]["world_size"] == 2
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM/munge not installed ({missing_binaries()}); "
                                                     ".ci/run installs slurm-wlm and munge")
def test_a_requeued_job_saves_on_the_signal_and_continues_from_auto(tmp_path):
    """`scontrol requeue` (what preemption with requeue does): slurmstepd signals the ranks, which save and exit 143;
    the job comes back under its id, so slurm/train.sbatch's --resume_from_checkpoint auto continues from that
    checkpoint to the end."""
    steps = 300
    args = ["--model_name_or_path", "tiny:llama", "--max_steps", str(steps), "--max_seq_length", "48",
            "--save_steps", "20", "--per_device_train_batch_size", "2", "--logging_steps", "10", "--num_samples", "0",
            "--eval_steps", "0", "--merge_at_end", "false"]
    with single_node_cluster(tmp_path / "cluster") as cluster_env:
        env = {**cpu_env(OUTPUT_ROOT=str(tmp_path / "runs")), "SLURM_CONF": cluster_env["SLURM_CONF"]}
        job = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1",
             f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", str(REPO / "slurm" / "train.sbatch"), *args],
            env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]
        log = tmp_path / f"slurm-{job}.out"
        wait_for(lambda: log.exists() and f"step 40/{steps}" in log.read_text(errors="replace"), 180, "step 40",
                 lambda: log.read_text(errors="replace")[-4000:] if log.exists() else "no log")
        subprocess.run(["scontrol", "requeue", job], env=env, check=True, timeout=60)
        wait_for(lambda: "JobState=PENDING" in _job_state(env, job), 120, "the requeued job pending")
        state = wait_for(lambda: _ended(env, job, release=True), 240, "the requeued job's end",
                         lambda: log.read_text(errors="replace")[-4000:], poll=1.0)
    output = log.read_text(errors="replace")
    ended = re.search(r"JobState=\S+ Reason=\S+", state)
    assert "JobState=COMPLETED" in state, \
        f"{ended.group(0) if ended else state[:800]}\n{output[-4000:]}\n{_slurmctld_log(tmp_path / 'cluster')}"
    stopped = re.findall(r"stopped by SIGTERM after step (\d+);", output)
    assert len(stopped) == 2 and stopped[0] == stopped[1], output[-4000:]  # both ranks, the same step
    step = int(stopped[0])
    assert f"resumed from {tmp_path / 'runs' / f'adamix-{job}' / 'checkpoints' / f'step-{step}'} at step {step}" in output
    assert sorted(train_losses(tmp_path / "runs" / f"adamix-{job}")) == list(range(step + 10 - step % 10, steps + 1, 10))
