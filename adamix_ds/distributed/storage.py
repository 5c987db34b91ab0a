"""Writing outputs from every rank without leaving one rank waiting for another that failed.

A write that fails on any rank (no space left, permission denied, a directory gone from a shared disk) becomes
the same StorageError on every rank, once the ranks have exchanged what happened; the entry points print it as
one line for the job (from rank 0) and exit with code 1. The message names the path, the space needed where it is
known, and what survives.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from . import collectives


class StorageError(RuntimeError):
    """An output could not be written; every rank of the job raises the same one."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.rank = collectives.rank()
        """The rank that raised it (the one that prints it is rank 0)."""


def _agree(failure: str | None, survives: str) -> None:
    """Collective: raise on every rank the first rank's failure, with what survives (where the caller knows)."""
    failed = next((m for m in collectives.all_gather_objects(failure) if m is not None), None)
    if failed is not None:
        raise StorageError(f"{failed}; {survives}" if survives else failed)


@contextlib.contextmanager
def agreed_writes(what: str, survives: str = ""):
    """Collective: run the block's writes (no collective inside it); a failure on any rank (an OSError, or what
    safetensors and torch raise on a full disk) becomes the same StorageError on every rank after the block."""
    failure = None
    try:
        yield
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        failure = f"{what} failed on rank {collectives.rank()}:{where}: {error.strerror or error}"
    except Exception as error:  # noqa: BLE001 - every failure must reach the exchange, or the other ranks wait
        failure = f"{what} failed on rank {collectives.rank()}: {type(error).__name__}: {error}"
    _agree(failure, survives)


def size_text(size: int) -> str:
    """Bytes in the largest unit that keeps a number of at least 1 (1000-based, as disks are sold): '187.3 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size} B"


def require_free_space(directory: Path, needed: int, what: str, survives: str = "") -> None:
    """Collective: every rank's disk under `directory` holds `needed` bytes more (with 5% to spare), or no rank
    starts writing."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    failure = None
    if free < needed * 1.05:
        failure = f"{what} needs {size_text(needed)} and {size_text(free)} are free (rank {collectives.rank()})"
    _agree(failure, survives)
