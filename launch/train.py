"""Train a mixture on a Hugging Face decoder: deepspeed launch/train.py --deepspeed ds_configs/zero3.json [options].

Options: python launch/train.py --help. Configuration errors exit with code 2.
"""

from adamix_ds.arguments import parse_arguments
from adamix_ds.cli import exit_process, run_main
from adamix_ds.training.recipe import train

if __name__ == "__main__":
    exit_process(run_main(lambda: train(*parse_arguments())))
