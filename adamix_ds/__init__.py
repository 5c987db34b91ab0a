"""adamix_ds: AdaMix (mixture-of-adaptations) and mixture-of-adapters fine-tuning on DeepSpeed."""

__version__ = "0.1.0"

from .accounting import ParameterCount, count_parameters
from .config import ConfigError, MixtureConfig
from .consistency import LossSums, causal_lm_losses, token_losses
from .merging import average_experts, fold_into_base, merge_experts, unfold_from_base
from .mixture_adapter import MixtureAdapter
from .mixture_checkpoint import CheckpointMismatch, load_mixtures, save_mixtures
from .mixture_lora import MixtureLoRA
from .mixture_families import inject_mixtures
from .mixture_set import MixtureSet
from .moa_set import MoASet
from .moe_lora_set import MoELoRASet
from .peft_export import export_peft_adapter
from .routing import RoutePlan, Router
from .targets import resolve_targets
from .token_router import TokenRouter

__all__ = [
    "CheckpointMismatch", "ConfigError", "LossSums", "MixtureAdapter", "MixtureConfig", "MixtureLoRA",
    "MixtureSet", "MoASet", "MoELoRASet", "ParameterCount", "TokenRouter", "inject_mixtures", "RoutePlan", "Router", "average_experts", "causal_lm_losses",
    "count_parameters", "export_peft_adapter", "fold_into_base", "load_mixtures", "merge_experts",
    "resolve_targets", "save_mixtures", "token_losses", "unfold_from_base",
]
