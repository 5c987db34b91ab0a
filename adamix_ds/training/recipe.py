"""The training entry: join the process group, build the trainer of the method's family, run it, leave."""

from __future__ import annotations

from .. import distributed
from ..arguments import DataArguments, ModelArguments, TrainArguments
from ..config import MixtureConfig
from .adamix_trainer import AdaMixTrainer
from .full_trainer import FullTrainer
from .routed_trainer import RoutedTrainer
from .trainer import Trainer

TRAINERS: dict[str, type[Trainer]] = {"adamix": AdaMixTrainer, "routed": RoutedTrainer, "full": FullTrainer}
"""The trainer of each method family (config.METHODS says which family a method belongs to)."""


def train(model_args: ModelArguments, data_args: DataArguments, mixture_config: MixtureConfig,
          args: TrainArguments) -> dict:
    """Run one training job on this rank; every rank of the job calls it."""
    distributed.init_process_group(timeout_s=args.ddp_timeout)
    distributed.setup_rank_logging()
    try:
        return TRAINERS[mixture_config.family](model_args, data_args, mixture_config, args).run()
    finally:
        distributed.destroy_process_group()
