"""What every entry point in launch/ shares: errors a user can act on become one line and an exit code, and the
process ends without the interpreter teardown that collective worker threads can crash."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import Callable, NoReturn

from .config import ConfigError
from .distributed.storage import StorageError
from .training.termination import EXIT_CODE, TrainingInterrupted


def run_main(main: Callable[[], object]) -> int:
    """Exit codes: 0 done, 1 an output could not be written (and other failures), 2 a configuration error, 143
    stopped by SIGTERM after saving a checkpoint."""
    try:
        main()
    except ConfigError as error:
        _say(f"adamix_ds: error: {error}")
        return 2
    except StorageError as error:
        if error.rank == 0:  # every rank raises the same one: the job says it once
            _say(f"adamix_ds: error: {error}")
        return 1
    except TrainingInterrupted as stop:
        _say(f"adamix_ds: {stop}")
        return EXIT_CODE
    return 0


def _say(line: str) -> None:
    """One line on stderr in one write, so that ranks sharing the launcher's stderr do not interleave it."""
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


def exit_process(code: int) -> NoReturn:
    """End an entry point's process with `code`: non-daemon threads are joined, exit handlers run and output is
    flushed; the interpreter teardown is skipped.

    A gloo worker thread frees a finished collective's tensors after the caller has moved on, and needs the GIL to
    drop their Python objects. The process groups outlive destroy_process_group (DeepSpeed keeps references), so
    such a thread can still be waiting for the GIL when the interpreter finalizes; it then ends mid-unwind and the
    process aborts ("terminate called without an active exception", signal 6) after a job that succeeded. Torch
    does not guard this (pytorch/pytorch#179291 was abandoned). MPI is finalized here because mpi4py's own exit
    hook belongs to the teardown.
    """
    for thread in threading.enumerate():  # as a normal exit does first
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
