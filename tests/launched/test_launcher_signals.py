"""A stop signal to the one process the user started (what `kill <pid>`, `docker stop` and Kubernetes send), for
each launcher: the ranks finish the step, save a complete checkpoint and end; none trains on as an orphan."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launching import REPO, cpu_env, free_port
from slurm_cluster import missing_binaries, single_node_cluster

STEPS = 100000


def _train_args(out: Path) -> list[str]:
    return [str(REPO / "launch" / "train.py"), "--model_name_or_path", "tiny:llama", "--max_steps", str(STEPS),
            "--max_seq_length", "48", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--num_samples", "0", "--eval_steps", "0", "--save_steps", "100000", "--merge_at_end", "false",
            "--output_dir", str(out)]


def _ranks_of(out: Path) -> list[int]:
    """Processes whose command line names this run's output directory (the ranks and the per-node launcher)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(out) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _end_session(process: subprocess.Popen) -> None:
    """Whatever of a launch's session is still alive ends (cleanup after the checks)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _started_past_step_3(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`command` in a session of its own, its output in `log`, once step 3 is logged (within 180 s)."""
    with open(log, "w") as handle:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    deadline = time.time() + 180
    while f"step 3/{STEPS}" not in log.read_text(errors="replace"):
        if launcher.poll() is not None or time.time() > deadline:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
            raise AssertionError(log.read_text(errors="replace")[-4000:])
        time.sleep(0.5)
    return launcher


def _stop_the_launcher_alone(command: list[str], out: Path, log: Path, env: dict) -> tuple[int, str]:
    """Start `command`, SIGTERM its first process once step 3 is logged, and wait until no process of the run is
    left; (the launcher's exit status, the log)."""
    launcher = _started_past_step_3(command, log, env)
    try:
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=60)
        deadline = time.time() + 60
        while _ranks_of(out) and time.time() < deadline:
            time.sleep(0.5)
        left = _ranks_of(out)
        assert not left, f"processes of the run still alive after the launcher ended: {left}"
        return launcher.returncode, log.read_text(errors="replace")
    finally:
        _end_session(launcher)


def _saved_after_step_3(out: Path, output: str) -> None:
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]
    assert len(saved) == 1, output[-4000:]
    step = int(saved[0].name.split("-")[1])
    assert 3 <= step < STEPS
    assert output.count(f"after step {step}; checkpoint saved under") == 2, output[-4000:]  # both ranks said so


def test_sigterm_to_the_deepspeed_runner_alone(tmp_path):
    """The runner does not forward it on one node and exits at once; the ranks see it go and stop."""
    out = tmp_path / "run"
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *_train_args(out)]
    status, output = _stop_the_launcher_alone(command, out, tmp_path / "log", cpu_env())
    assert status == -signal.SIGTERM  # a shell reports 143
    assert "the end of the launcher deepspeed (pid" in output
    _saved_after_step_3(out, output)


def test_sigterm_to_one_rank_of_two_stops_both_after_the_same_step(tmp_path):
    """The ranks agree every step: rank 1 alone is signalled, and both stop after one step, saved, exit 143."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *_train_args(out)]
    launcher = _started_past_step_3(command, log, cpu_env())
    try:
        rank_1 = [pid for pid in _ranks_of(out) if "--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(rank_1) == 1
        os.kill(rank_1[0], signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        _end_session(launcher)
    output = log.read_text(errors="replace")
    assert launcher.returncode == 143, output[-4000:]
    assert "SIGTERM on rank 1" in output and "SIGTERM on rank 0" not in output
    stops = sorted(line.split("adamix_ds: stopped by ", 1)[1] for line in output.splitlines()
                   if "adamix_ds: stopped by " in line)
    assert len(stops) == 2 and stops[0].startswith("SIGTERM after step") and "another rank" in stops[1], stops
    assert stops[0].split(" after ")[1] == stops[1].split(" after ")[1]  # the same step, the same checkpoint
    _saved_after_step_3(out, output)


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no MPI launcher (pip install mpich mpi4py)")
def test_sigterm_to_mpiexec_alone(tmp_path):
    out = tmp_path / "run"
    command = ["mpiexec", "-n", "2", "python", *_train_args(out)]
    status, output = _stop_the_launcher_alone(command, out, tmp_path / "log", cpu_env(MASTER_PORT=str(free_port())))
    assert status in (143, -signal.SIGTERM), output[-4000:]
    _saved_after_step_3(out, output)


@pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM/munge not installed ({missing_binaries()})")
def test_srun_kills_its_tasks_on_sigterm_and_scancel_signal_term_stops_them_gracefully(tmp_path):
    """srun turns a SIGTERM it receives into SIGKILL of its tasks (Slurm's job_force_termination), so no rank can
    save then: every rank is gone at once and the last complete checkpoint survives. `scancel --signal=TERM` (as
    preemption and the time limit do) reaches the ranks themselves: they save and exit with 143."""
    out = tmp_path / "run"
    ranks = "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec python \"$@\""
    with single_node_cluster(tmp_path / "cluster") as cluster_env:
        env = cpu_env(SLURM_CONF=cluster_env["SLURM_CONF"], MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        command = ["srun", "--mpi=none", "--ntasks=2", "--cpus-per-task=1", f"--chdir={REPO}", "bash", "-c", ranks,
                   "bash", *_train_args(out), "--save_steps", "2", "--save_total_limit", "1"]
        status, output = _stop_the_launcher_alone(command, out, tmp_path / "log", env)
        assert status != 0 and "forcing job termination" in output
        assert "checkpoint saved under" not in output  # SIGKILL: no rank had the chance
        assert [p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").is_file()]

        resumed = command + ["--resume_from_checkpoint", "auto"]
        with open(tmp_path / "log2", "w") as handle:
            srun = subprocess.Popen(resumed, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 180
            while "resumed from" not in (tmp_path / "log2").read_text(errors="replace"):
                assert srun.poll() is None and time.time() < deadline, (tmp_path / "log2").read_text()[-4000:]
                time.sleep(0.5)
            job = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True,
                                 timeout=60).stdout.split()
            subprocess.run(["scancel", "--signal=TERM", job[0]], env=env, check=True, timeout=60)
            srun.wait(timeout=120)
        finally:
            _end_session(srun)
    output = (tmp_path / "log2").read_text(errors="replace")
    assert srun.returncode == 143, output[-4000:]
    assert output.count("stopped by SIGTERM after step") == 2, output[-4000:]


def test_sigterm_during_the_final_scoring_ends_the_job_within_10_s_after_the_export(tmp_path):
    """After the last step the scoring generates for minutes; a SIGTERM to one rank then stops both ranks between
    two forwards (the other rank learns it from the agreement): exit 143 within 10 s, the checkpoint and the export
    already written, and the log and run.json say what was skipped."""
    out = tmp_path / "run"
    log = tmp_path / "log"
    args = ["--model_name_or_path", "tiny:llama", "--max_steps", "2", "--max_seq_length", "48",
            "--per_device_train_batch_size", "2", "--eval_steps", "0", "--save_steps", "0", "--num_samples", "1",
            "--sample_max_new_tokens", "60", "--slot_accuracy", "--per_device_eval_batch_size", "1",
            "--output_dir", str(out)]
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
               *args]
    with open(log, "w") as handle:
        launcher = subprocess.Popen(command, cwd=REPO, env=cpu_env(), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        deadline = time.time() + 240
        while "INFO sample:" not in log.read_text(errors="replace"):  # the samples are written: scoring begins
            assert launcher.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
        rank_1 = [pid for pid in _ranks_of(out) if "--local_rank=1" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(rank_1) == 1
        os.kill(rank_1[0], signal.SIGTERM)
        signalled = time.time()
        launcher.wait(timeout=120)
        took = time.time() - signalled
    finally:
        _end_session(launcher)
    output = log.read_text(errors="replace")
    assert launcher.returncode == 143, output[-4000:]
    assert took < 10, f"{took:.1f} s\n{output[-4000:]}"
    assert "stopped by SIGTERM during the slot accuracy" in output
    assert output.count("skipped: the slot accuracy") == 2, output[-4000:]
    assert (out / "checkpoints" / "step-2" / "COMPLETE").is_file()
    assert (out / "merged" / "model" / "config.json").is_file() and (out / "samples.jsonl").is_file()
    assert json.loads((out / "run.json").read_text())["skipped"] == ["the slot accuracy"]
