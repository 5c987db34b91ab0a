"""SIGTERM (what SLURM sends before preemption or the time limit), or the end of the launcher the user started:
finish the step, save, exit with 143.

The request may reach ranks at different moments; every step the ranks agree (one tiny all-reduce) so
that all of them stop after the same step and the checkpoint is complete. After the last step, the final
evaluation, the samples and the scoring (minutes of generation on a real model) are cut short the same way,
between two forwards of the decoder; the checkpoint and the export are still written.
"""

from __future__ import annotations

import contextlib
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


class StopRequested(RuntimeError):
    """Every rank agreed to stop in the middle of work that can be skipped (final evaluation, samples, scoring)."""


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

    @contextlib.contextmanager
    def checked_before_each_forward(self, module: torch.nn.Module):
        """Within the block, each forward of `module` first asks whether any rank was asked to stop (collective), and
        raises StopRequested on every rank together if so. Every rank runs the same forwards there: generation under
        ZeRO-3 is synced (a finished rank runs on with the others), evaluation batches are as many on every rank."""

        def check(*_args) -> None:
            if self.agreed():
                raise StopRequested(self.cause)

        handle = module.register_forward_pre_hook(check)
        try:
            yield
        finally:
            handle.remove()
