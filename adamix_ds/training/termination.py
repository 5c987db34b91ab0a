"""SIGTERM (what SLURM sends before preemption or the time limit): finish the step, save, exit.

The signal may reach ranks at different moments; every step the ranks agree (one tiny all-reduce) so
that all of them stop after the same step and the checkpoint is complete.
"""

from __future__ import annotations

import logging
import signal

import torch

from .. import distributed

logger = logging.getLogger("adamix_ds")
EXIT_CODE = 128 + signal.SIGTERM


class TrainingInterrupted(RuntimeError):
    """The run stopped on SIGTERM after saving a checkpoint; it continues with --resume_from_checkpoint auto."""


class TerminationRequest:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.requested:
            logger.warning("SIGTERM received on rank %d: stopping after this step with a checkpoint", distributed.rank())
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank once any rank has received SIGTERM (collective)."""
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return distributed.all_reduce_sum(flag).item() > 0
