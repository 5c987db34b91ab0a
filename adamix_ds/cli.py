"""What every entry point in launch/ shares: configuration errors become one line and exit code 2."""

from __future__ import annotations

import sys
from typing import Callable

from .config import ConfigError


def run_main(main: Callable[[], object]) -> int:
    try:
        main()
    except ConfigError as error:
        print(f"adamix_ds: error: {error}", file=sys.stderr)
        return 2
    return 0
