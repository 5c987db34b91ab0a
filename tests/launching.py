"""One way to run the real entry points from tests: N CPU ranks through the deepspeed launcher (or one
plain process), with a hard timeout so that a hang fails the test instead of CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

from adamix_ds.distributed.collectives import free_port

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def cpu_env(**extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("RANK", None)
    env.update(extra)
    return env


def run_entry(script: str, args: list[str], ranks: int = 1, timeout: float = 300, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launch/<script> on `ranks` CPU ranks; on failure or timeout, fail with the output's tail."""
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "launch" / script), *args]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               str(REPO / "launch" / script), *args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"")[-4000:] if isinstance(error.stdout, bytes) else (error.stdout or "")[-4000:]
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout} s:\n{out}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def run_record(output_dir: Path) -> dict:
    return json.loads((Path(output_dir) / "run.json").read_text())


def train_losses(output_dir: Path) -> dict[int, float]:
    return {h["step"]: h["train/loss"] for h in run_record(output_dir)["history"] if "train/loss" in h}


def wait_for(event: Callable[[], T], timeout: float, what: str, shown: Callable[[], str] = str, poll: float = 0.2) -> T:
    """Wait for `event()` to return something true and return it; fail naming `what` (and what `shown()` says, a
    log's tail) after `timeout` seconds. Tests wait for the event itself this way, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        seen = event()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s\n{shown()}")
        time.sleep(poll)


def read_line(stream: IO[str], timeout: float) -> str:
    """The next line of a pipe, or a failure after `timeout` seconds: a silent child fails the test, not CI."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines:
        raise AssertionError(f"no line within {timeout} s")
    return lines[0]
