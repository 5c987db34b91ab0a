"""What every entry point in launch/ shares: errors a user can act on become one line and an exit code."""

from __future__ import annotations

import sys
from typing import Callable

from .config import ConfigError
from .termination import EXIT_CODE, TrainingInterrupted


def run_main(main: Callable[[], object]) -> int:
    """Exit codes: 0 done, 2 a configuration error, 143 stopped by SIGTERM after saving a checkpoint."""
    try:
        main()
    except ConfigError as error:
        print(f"adamix_ds: error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"adamix_ds: {stop}", file=sys.stderr)
        return EXIT_CODE
    return 0
