"""Merge a saved training checkpoint on N ranks: the same collective the trainer runs after training."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from .. import distributed
from ..arguments import ModelArguments, TrainArguments
from ..config import ConfigError
from ..data.tokenizer import load_tokenizer
from ..distributed.ds_config import load_ds_config, resolve_ds_config
from ..distributed.sharded_base import load_base
from ..distributed.storage import StorageError
from .merged_model import export_mixtures
from .mixture_checkpoint import load_mixtures

logger = logging.getLogger("adamix_ds")


@dataclass
class MergeArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint directory (OUTPUT_DIR/checkpoints/step-N) or a mixture "
                                              "checkpoint directory."})
    output_dir: str = field(metadata={"help": "merged/adapter and merged/model are written under it."})
    deepspeed: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed config for the base."})
    seed: int = field(default=42, metadata={"help": "The training --seed: a built-in (tiny:*, small:*) base is "
                                                    "re-created from it."})


def parse_merge_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, MergeArguments]:
    parser = HfArgumentParser((ModelArguments, MergeArguments))
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; unused.")
    model_args, merge_args, _ = parser.parse_args_into_dataclasses(args=argv)
    return model_args, merge_args


def merge_checkpoint(model_args: ModelArguments, args: MergeArguments) -> dict[str, str]:
    """Every rank: load the base (partitioned under ZeRO-3) and the checkpoint's mixtures strictly, merge, export."""
    distributed.init_process_group()
    distributed.setup_rank_logging()
    try:
        return _merge(model_args, args)
    finally:
        distributed.destroy_process_group()


def _merge(model_args: ModelArguments, args: MergeArguments) -> dict[str, str]:
    if not Path(args.checkpoint).is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint}: not a directory")
    tokenizer = load_tokenizer(model_args)
    ds_config, _ = resolve_ds_config(load_ds_config(args.deepspeed), TrainArguments(), distributed.world_size(),
                                     steps_for=lambda plan: 1)
    base = load_base(model_args, ds_config, vocab_size=len(tokenizer), seed=args.seed)
    mixtures = load_mixtures(base.model, args.checkpoint).to(base.device)
    try:
        out = export_mixtures(base.model, mixtures, Path(args.output_dir), tokenizer, model_args.model_name_or_path)
    except StorageError as error:
        raise StorageError(f"{error}; the checkpoint {args.checkpoint} is unchanged: free space and rerun") from None
    logger.info("merged outputs: %s", out)
    return out
