"""adamix_ds: AdaMix (mixture-of-adaptations) and mixture-of-adapters fine-tuning on DeepSpeed."""

from .config import ConfigError, MixtureConfig
from .export.mixture_checkpoint import CheckpointMismatch, load_mixtures, save_mixtures
from .export.peft_adapter import export_peft_adapter
from .methods.accounting import ParameterCount, count_parameters
from .methods.adamix.merging import average_experts, fold_into_base, merge_experts, unfold_from_base
from .methods.adamix.mixture_adapter import MixtureAdapter
from .methods.adamix.mixture_lora import MixtureLoRA
from .methods.adamix.mixture_set import MixtureSet
from .methods.adamix.stochastic_routing import RoutePlan, StochasticRouter
from .methods.registry import inject_mixtures, resolve_targets
from .methods.routed.moa_set import MoASet
from .methods.routed.moe_lora_set import MoELoRASet
from .methods.routed.token_router import TokenRouter
from .training.losses import LossSums, causal_lm_losses, token_losses
from .version import __version__

Router = StochasticRouter
"""AdaMix's stochastic router under its earlier name, kept for code that imports it."""

__all__ = [
    "CheckpointMismatch", "ConfigError", "LossSums", "MixtureAdapter", "MixtureConfig", "MixtureLoRA", "MixtureSet",
    "MoASet", "MoELoRASet", "ParameterCount", "RoutePlan", "Router", "StochasticRouter", "TokenRouter", "__version__",
    "average_experts", "causal_lm_losses", "count_parameters", "export_peft_adapter", "fold_into_base",
    "inject_mixtures", "load_mixtures", "merge_experts", "resolve_targets", "save_mixtures", "token_losses",
    "unfold_from_base",
]
