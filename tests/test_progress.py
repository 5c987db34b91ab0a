"""On a terminal, rank 0 shows a tqdm progress bar with step, loss, tokens/s and the ETA."""

import shutil
import subprocess
import sys

import pytest

from launching import REPO, cpu_env


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux 'script' provides the pseudo-terminal")
def test_progress_bar_on_a_terminal(tmp_path):
    command = (f"{sys.executable} launch/train.py --model_name_or_path tiny:llama --max_steps 3 "
               f"--max_seq_length 48 --per_device_train_batch_size 2 --num_samples 0 --eval_steps 0 "
               f"--merge_at_end false --output_dir {tmp_path}")
    proc = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=REPO, env=cpu_env(TERM="xterm"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    bar = [chunk for chunk in proc.stdout.replace("\r", "\n").splitlines() if chunk.startswith("training:")]
    assert any("3/3" in chunk and "loss=" in chunk and "tok_s=" in chunk for chunk in bar), bar[-3:]
