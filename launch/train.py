"""Train a mixture on a Hugging Face decoder: deepspeed launch/train.py --deepspeed ds_configs/zero3.json [options].

Options: python launch/train.py --help. Configuration errors exit with code 2.
"""

import sys

from adamix_ds.arguments import parse_arguments
from adamix_ds.config import ConfigError
from adamix_ds.trainer import train


def main() -> int:
    try:
        train(*parse_arguments())
    except ConfigError as error:
        print(f"adamix_ds: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
