"""SIGTERM (what SLURM sends before preemption or the time limit), or the end of the launcher the user started:
finish the step, save, exit with 143.

The request may reach ranks at different moments; every step the ranks agree (one tiny all-reduce) so
that all of them stop after the same step and the checkpoint is complete.
"""

from __future__ import annotations

import logging
import signal

import torch

from .. import distributed
from .launcher_watch import watch_launcher

logger = logging.getLogger("adamix_ds")
EXIT_CODE = 128 + signal.SIGTERM


class TrainingInterrupted(RuntimeError):
    """The run stopped (SIGTERM, or its launcher gone) after saving a checkpoint; it continues with
    --resume_from_checkpoint auto."""


class TerminationRequest:
    """A stop asked for by SIGTERM, or by the end of the launcher the user started (launcher_watch.py)."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        signal.signal(signal.SIGTERM, self._on_signal)
        watch_launcher(self._on_launcher_gone)

    def request(self, cause: str) -> None:
        if not self.requested:
            logger.warning("%s on rank %d: stopping after this step with a checkpoint", cause, distributed.rank())
            self.reason = cause
        self.requested = True

    @property
    def cause(self) -> str:
        """What stopped this rank, for the last line: this rank's own cause, or another rank's request."""
        return self.reason or "a stop request on another rank"

    def _on_signal(self, signum, frame) -> None:
        self.request("SIGTERM")

    def _on_launcher_gone(self, launcher: str) -> None:
        self.request(f"the end of the launcher {launcher}")

    def agreed(self) -> bool:
        """True on every rank once any rank has been asked to stop (collective)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return distributed.all_reduce_sum(flag).item() > 0
