"""What a run reports, from rank 0: TensorBoard scalars, hyper-parameters, a progress bar or log lines.

TensorBoard follows the DeepSpeed config's `tensorboard` section (enabled, output_path, job_name;
default OUTPUT_DIR/tensorboard). On a terminal a tqdm bar shows step, loss, tokens/s and ETA; where
output is not a terminal (SLURM logs) one line every --logging_steps carries the same, so logs stay
readable. Other ranks stay quiet except for warnings and errors.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from .. import distributed

logger = logging.getLogger("adamix_ds")


def peak_memory_gb() -> float:
    """Peak device memory of this process on a GPU, else its peak resident set size (both in GB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    try:  # VmHWM: the peak since the last reset_peak_memory(), where Linux allows resetting it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def reset_peak_memory() -> bool:
    """Start a new peak: CUDA's allocator statistics, or on a CPU the process's peak RSS (Linux clear_refs 5).

    Returns False where the CPU peak cannot be reset (then peak_memory_gb is the peak so far).
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _per_layer(key: str) -> bool:
    """Per-layer and per-expert scalars go to TensorBoard only; log lines carry the model-wide summaries."""
    return key.startswith("experts/") or "/layer_" in key


class Monitor:
    def __init__(self, ds_config: dict, output_dir: Path, total_steps: int, start_step: int = 0) -> None:
        self.total_steps = total_steps
        self.writer = None
        self.bar = None
        self.started = time.perf_counter()
        self.start_step = start_step
        if not distributed.is_main():
            return
        section = ds_config.get("tensorboard", {})
        if section.get("enabled", True):
            from torch.utils.tensorboard import SummaryWriter

            root = Path(section.get("output_path") or output_dir / "tensorboard")
            self.writer = SummaryWriter(log_dir=str(root / section.get("job_name", "")))
        if sys.stdout.isatty():
            from tqdm import tqdm

            width = shutil.get_terminal_size((100, 20)).columns  # a pseudo-terminal may report 0 columns
            self.bar = tqdm(total=total_steps, initial=start_step, desc="training", ncols=width, file=sys.stdout)

    @property
    def log_dir(self) -> str | None:
        return self.writer.log_dir if self.writer is not None else None

    def hyperparameters(self, record: dict) -> None:
        """The resolved configuration, once, as a TensorBoard text entry."""
        if self.writer is not None:
            self.writer.add_text("hyperparameters", "```\n" + json.dumps(record, indent=2, default=str) + "\n```", 0)

    def resumed_at(self, step: int) -> None:
        self.start_step = step
        self.started = time.perf_counter()
        if self.bar is not None:
            self.bar.reset(total=self.total_steps)
            self.bar.update(step)

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        return (time.perf_counter() - self.started) / done * (self.total_steps - step) if done > 0 else float("nan")

    def step_done(self, step: int, metrics: dict) -> None:
        """Every step: advance the bar (rank 0 on a terminal)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['perf/tokens_per_s']:.0f}")

    def log(self, step: int, metrics: dict) -> None:
        """Write scalars to TensorBoard and one log line (with ETA for training metrics)."""
        if not distributed.is_main():
            return
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        shown = " ".join(f"{k}={v:.5g}" for k, v in metrics.items() if not _per_layer(k))
        eta = f" eta={self.eta_s(step):.0f}s" if "train/loss" in metrics else ""
        message = f"step {step}/{self.total_steps}{eta} {shown}"
        if self.bar is not None:
            self.bar.write(message)
        else:
            logger.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
