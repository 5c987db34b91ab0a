"""Reliability: non-finite steps are skipped and bounded; nothing non-finite reaches a checkpoint."""

import json
import subprocess
import sys

import pytest
from launching import REPO, cpu_env, free_port, run_record
from safetensors.torch import load_file

# Runs the real trainer with the loss made NaN from step FIRST_BAD on for COUNT steps, on rank POISON_RANK only
# (every rank when it is unset).
NAN_RUN = """
import os
import sys
import adamix_ds.training.adamix_trainer as mt
from adamix_ds import distributed
from adamix_ds.arguments import parse_arguments
from adamix_ds.training.recipe import train

first_bad, count = int(os.environ["FIRST_BAD"]), int(os.environ["COUNT"])
poison_rank = int(os.environ.get("POISON_RANK", "-1"))
original = mt.causal_lm_losses

def poisoned(model, *args, router=None, **kwargs):
    sums = original(model, *args, router=router, **kwargs)
    hit = poison_rank < 0 or distributed.rank() == poison_rank
    if hit and router is not None and first_bad <= router.step < first_bad + count:
        sums.lm = sums.lm * float("nan")
    return sums

mt.causal_lm_losses = poisoned
train(*parse_arguments(sys.argv[1:]))
"""


def _run(tmp_path, first_bad, count, limit, ranks=1):
    args = ["--model_name_or_path", "tiny:llama", "--max_steps", "6", "--max_seq_length", "48",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--num_samples", "0", "--eval_steps", "0",
            "--merge_at_end", "false", "--save_steps", "2", "--max_nonfinite_steps", str(limit),
            "--output_dir", str(tmp_path / "run")]
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_RUN)
    env = cpu_env(FIRST_BAD=str(first_bad), COUNT=str(count), **({"POISON_RANK": "1"} if ranks > 1 else {}))
    launcher = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())] if ranks > 1 \
        else [sys.executable]
    return subprocess.run([*launcher, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_nonfinite_loss_on_one_rank_of_two_is_skipped_on_both(tmp_path):
    """Rank 1 alone sees NaN at steps 3 and 4: the gradient all-reduce carries it to rank 0, both skip the same
    steps, and the replicas still agree at the end (the run's final check)."""
    proc = _run(tmp_path, first_bad=2, count=2, limit=3, ranks=2)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    history = [h for h in run_record(tmp_path / "run")["history"] if "train/loss" in h]
    assert [h["train/skipped"] for h in history] == [0, 0, 1, 1, 0, 0]
    for rank in (0, 1):
        assert f"[rank{rank}] WARNING step 3: non-finite loss or gradient, update skipped (1 in a row, limit 3)" \
            in output, output[-3000:]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "step-6" / "mixtures.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    proc = _run(tmp_path, first_bad=3, count=10, limit=2)
    assert proc.returncode != 0
    assert "stopping at step 5: 2 non-finite steps in a row (--max_nonfinite_steps 2)" in proc.stderr
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-2", "step-4"]  # step 4 was skipped, not applied: its checkpoint is clean
    for name in saved:
        weights = load_file(str(tmp_path / "run" / "checkpoints" / name / "mixtures.safetensors"))
        assert all(bool(t.isfinite().all()) for t in weights.values())


def _train_args(out, steps):
    return ["--model_name_or_path", "tiny:llama", "--max_steps", str(steps), "--max_seq_length", "48",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--num_samples", "0", "--eval_steps", "0",
            "--merge_at_end", "false", "--save_steps", "1000", "--output_dir", str(out)]


def test_sigterm_saves_and_the_requeued_run_continues_exactly(tmp_path):
    import signal
    import time

    from launching import train_losses

    steps = 40
    log = tmp_path / "log"
    with open(log, "w") as handle:  # a file, read with a deadline: a hang fails the test instead of stalling it
        proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"),
                                 *_train_args(tmp_path / "run", steps)],
                                cwd=REPO, env=cpu_env(), stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while f"step 3/{steps}" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    output = log.read_text(errors="replace")
    assert proc.returncode == 143, output[-3000:]
    assert time.time() - signalled < 60
    assert "stopped by SIGTERM after step" in output
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")
    stopped_at = int(saved[0].split("-")[1])
    assert 3 <= stopped_at < steps
    resumed = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"),
                              *_train_args(tmp_path / "run", steps), "--resume_from_checkpoint", "auto"],
                             cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *_train_args(tmp_path / "ref", steps)],
                              cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0
    after, reference = train_losses(tmp_path / "run"), train_losses(tmp_path / "ref")
    assert sorted(after) == list(range(stopped_at + 1, steps + 1))
    assert all(after[s] == reference[s] for s in after)


def _typo_config(tmp_path):
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["train_micro_batch_size_per_gp"] = config.pop("train_micro_batch_size_per_gpu")
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        ("method", "--method='prefix' is not allowed"),
        ("experts", "--num_experts=0 is not allowed: an integer >= 1"),
        ("rank", "--lora_r=0 is not allowed: an integer > 0"),
        ("targets", "--target_modules pattern 'qq_proj' matches no linear layer; linear layers: model.layers.*"),
        ("attention", "--attn_implementation='flash_attn': Specified `attn_implementation=\"flash_attn\"` is not "
                      "supported"),
        ("ds_key", "unknown key 'train_micro_batch_size_per_gp'; did you mean 'train_micro_batch_size_per_gpu'?"),
        ("ds_json", "not valid JSON"),
        ("batch", "train_batch_size=5 but micro-batch 4 x accumulation 1 x 1 ranks = 4"),
        ("output", "--output_dir"),
    ],
)
def test_bad_configuration_fails_fast_with_one_line_and_code_2(case, message, tmp_path):
    args = {"method": ["--method", "prefix"], "experts": ["--num_experts", "0"], "rank": ["--lora_r", "0"],
            "targets": ["--target_modules", "qq_proj"], "ds_key": ["--deepspeed", _typo_config(tmp_path)],
            "attention": ["--attn_implementation", "flash_attn"]}.get(case, [])
    if case == "ds_json":
        (tmp_path / "bad.json").write_text('{"train_batch_size": 4,,}')
        args = ["--deepspeed", str(tmp_path / "bad.json")]
    if case == "batch":
        config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        config["train_batch_size"] = 5
        (tmp_path / "batch.json").write_text(json.dumps(config))
        args = ["--deepspeed", str(tmp_path / "batch.json"), "--per_device_train_batch_size", "4"]
    output = tmp_path / "out"
    if case == "output":
        (tmp_path / "a_file").write_text("")
        output = tmp_path / "a_file" / "out"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--model_name_or_path", "tiny:llama",
                           "--output_dir", str(output), *args], cwd=REPO,
                          env=cpu_env(ADAMIX_DS_CACHE=str(tmp_path / "cache")),  # no cached tokens to hide work
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("adamix_ds: error:") or "error:" in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "tokenizing" not in proc.stderr + proc.stdout and "base parameters" not in proc.stdout


KILLED_RANK_BOUND_S = 60
"""docs/reliability.md's bound for a killed rank ending the job on one host (launcher and every rank gone)."""


def _ranks(launcher_pid: int) -> dict:
    """The launch's ranks by local rank: its processes started with --local_rank=N."""
    import psutil

    ranks = {}
    for process in psutil.Process(launcher_pid).children(recursive=True):
        flags = [part for part in process.cmdline() if part.startswith("--local_rank=")]
        if flags:
            ranks[int(flags[0].split("=")[1])] = process
    return ranks


def test_a_killed_rank_ends_the_job_and_resume_continues(tmp_path):
    """SIGKILL one of 2 ranks mid-training: the launcher and the other rank exit within docs/reliability.md's bound, checked
    before anything is cleaned up; then --resume_from_checkpoint auto continues from the last complete checkpoint."""
    import os
    import signal
    import time

    import psutil
    from launching import free_port, train_losses, wait_for

    args = _train_args(tmp_path / "run", 400) + ["--save_steps", "2"]
    log = tmp_path / "log"
    with open(log, "w") as handle:
        launcher = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                                     str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=cpu_env(),
                                    stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "checkpoints/step-4\n" in log.read_text(errors="replace") or launcher.poll() is not None, 240,
                 "the checkpoint of step 4", lambda: log.read_text(errors="replace")[-4000:])
        ranks = _ranks(launcher.pid)
        assert sorted(ranks) == [0, 1], log.read_text(errors="replace")[-4000:]
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait(timeout=KILLED_RANK_BOUND_S + 30)
        _, alive = psutil.wait_procs([ranks[0]], timeout=max(0.0, KILLED_RANK_BOUND_S - (time.monotonic() - killed)))
        ended_after = time.monotonic() - killed
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not alive, f"rank 0 still running {ended_after:.0f} s after rank 1 was killed"
    assert launcher.returncode != 0 and ended_after < KILLED_RANK_BOUND_S, ended_after
    complete = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir()
                      if p.name.startswith("step-") and (p / "COMPLETE").is_file())
    assert complete and complete[-1] >= 4
    resumed = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                              str(REPO / "launch" / "train.py"), *_train_args(tmp_path / "run", complete[-1] + 2),
                              "--resume_from_checkpoint", "auto"],
                             cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert sorted(train_losses(tmp_path / "run")) == [complete[-1] + 1, complete[-1] + 2]
