"""Train a mixture on a Hugging Face decoder: deepspeed launch/train.py --deepspeed ds_configs/zero3.json [options].

Options: python launch/train.py --help. Configuration errors exit with code 2.
"""

import sys

from adamix_ds.arguments import parse_arguments
from adamix_ds.cli import run_main
from adamix_ds.trainer import train

if __name__ == "__main__":
    sys.exit(run_main(lambda: train(*parse_arguments())))
