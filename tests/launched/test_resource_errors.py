"""A disk that fills up at the end of a 2-rank job (a real tmpfs of 96 KiB in a private mount namespace, so root
is needed): the job ends with one line naming the merged model, the space it needs and the merge command that
finishes it from the complete checkpoint; no rank prints a traceback."""

import os
import shutil
import subprocess

import pytest
from launching import REPO, cpu_env, free_port

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and util-linux's unshare to mount a small tmpfs")


@needs_root
def test_a_full_disk_at_the_export_is_one_line_and_the_checkpoint_survives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    train = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch" / "train.py"),
             "--output_dir", str(out), "--max_steps", "2", "--save_steps", "0", "--num_samples", "0",
             "--model_name_or_path", "tiny:llama", "--max_seq_length", "48", "--per_device_train_batch_size", "2"]
    script = f"mount -t tmpfs -o size=96k tmpfs {out} && exec {' '.join(train)}"
    env = cpu_env(ADAMIX_DS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    errors = [line for line in output.splitlines() if "adamix_ds: error:" in line]
    assert len(errors) == 1, output[-4000:]
    assert "writing the merged model" in errors[0] and " are free (rank " in errors[0], errors[0]
    assert "checkpoints up to step-2 are complete" in errors[0] and "launch/merge.py --checkpoint" in errors[0]
    assert "Traceback" not in output
