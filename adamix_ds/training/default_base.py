"""How the shipped default base (resources/restaurants_base, `--model_name_or_path shipped:restaurants`) is made.

A small:llama with the default task's sentencepiece tokenizer, drawn with a fixed seed, pretrained by this
trainer's own `--method full` (one rank, ZeRO-3, seeded) on data.default_corpus's rows (a settings line, two
descriptions), then copied with its tokenizer into the package. `python launch/pretrain_default_base.py` makes it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..arguments import parse_arguments
from ..builtin_models import DEFAULT_BASE, SHIPPED_BASES, SMALL_CONFIGS
from ..data import default_task
from ..data.default_corpus import SEED, pretraining_rows, write_text_rows
from .initial_model import write_initial_model
from .recipe import train

logger = logging.getLogger(__name__)

ROWS = 30_000
HELD_OUT = 1_000
"""Of the rows, the last ones are the pretraining's own dev set."""
PRETRAINING = {
    "method": "full", "data_format": "text", "packing": "true", "max_seq_length": "128",
    "per_device_train_batch_size": "16", "learning_rate": "2e-3", "warmup_steps": "60", "max_steps": "1200",
    "weight_decay": "0.01", "lr_scheduler_type": "cosine", "logging_steps": "50", "eval_steps": "400",
    "save_steps": "0", "num_samples": "2", "seed": "0", "deepspeed": "ds_configs/zero3.json",
}


def pretrain_default_base(work_dir: Path, out_dir: Path = SHIPPED_BASES[DEFAULT_BASE], **overrides: str) -> Path:
    """Pretrain the default base in this process and write it (weights, config, tokenizer, provenance) to out_dir."""
    work_dir = Path(work_dir)
    rows, dropped = pretraining_rows(ROWS)
    train_file = write_text_rows(rows[:-HELD_OUT], work_dir / "corpus" / "train.jsonl")
    dev_file = write_text_rows(rows[-HELD_OUT:], work_dir / "corpus" / "validation.jsonl")
    initial = write_initial_model(work_dir / "initial-model", Path(default_task.tokenizer_model()),
                                  SMALL_CONFIGS["llama"], default_task.VOCAB_SIZE, seed=0)
    options = {**PRETRAINING, **overrides, "model_name_or_path": str(initial), "data_path": str(train_file),
               "eval_data_path": str(dev_file), "output_dir": str(work_dir / "run")}
    argv = [part for key, value in options.items() for part in (f"--{key}", value)]
    logger.info("pretraining the default base: %s", " ".join(argv))
    summary = train(*parse_arguments(argv))
    merged = work_dir / "run" / "merged" / "model"
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(merged, staging)
    (staging / "provenance.json").write_text(json.dumps({
        "made_by": "python launch/pretrain_default_base.py", "pretraining_options": options | {
            "model_name_or_path": "small:llama, seed 0", "data_path": "data.default_corpus", "eval_data_path":
            "data.default_corpus", "output_dir": "-"},
        "corpus": {"generator": "adamix_ds.data.default_corpus", "seed": SEED, "rows": ROWS,
                   "row": "a settings line (key=value) and two wordings of one drawn meaning",
                   "held_out_for_dev": HELD_OUT,
                   "rows_dropped_for_a_task_target": dropped},
        "final_eval": summary.get("final_eval"), "final_step": summary.get("final_step"),
    }, indent=2, default=str) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    logger.info("wrote the default base to %s", out_dir)
    return out_dir
