"""Make the shipped default base again (adamix_ds/resources/restaurants_base): python launch/pretrain_default_base.py

Pretrains a small Llama with this trainer's --method full on one CPU rank (about 15 minutes on 2 cores); extra
options override the pretraining's, e.g. --max_steps 20 --work_dir /tmp/base --out_dir /tmp/base/model for a try.
"""

import argparse
import os
from pathlib import Path

from adamix_ds.builtin_models import DEFAULT_BASE, SHIPPED_BASES
from adamix_ds.cli import exit_process, run_main
from adamix_ds.training.default_base import pretrain_default_base

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="outputs/default_base")
    parser.add_argument("--out_dir", default=str(SHIPPED_BASES[DEFAULT_BASE]))
    known, rest = parser.parse_known_args()
    overrides = dict(zip((key.removeprefix("--") for key in rest[::2]), rest[1::2]))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    exit_process(run_main(lambda: pretrain_default_base(Path(known.work_dir), Path(known.out_dir), **overrides)))
