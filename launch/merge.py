"""Merge a checkpoint's experts into one module and write merged/adapter and merged/model (shard-aware).

deepspeed launch/merge.py --checkpoint OUT/checkpoints/step-N --model_name_or_path BASE --output_dir OUT
"""

from adamix_ds.cli import exit_process, run_main
from adamix_ds.export.merge_job import merge_checkpoint, parse_merge_arguments

if __name__ == "__main__":
    exit_process(run_main(lambda: merge_checkpoint(*parse_merge_arguments())))
