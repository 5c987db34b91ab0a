"""Checks that run before any heavy work, identically on every rank: a bad option costs seconds, not a
queue slot. Each failure is one ConfigError line naming the option, the value and what is allowed."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..arguments import ModelArguments, TrainArguments
from ..config import EVAL_MODES, METHODS, ConfigError, MixtureConfig
from ..distributed.sharded_base import require_activation_checkpointing
from ..methods.registry import resolve_targets

DEEPSPEED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16 bfloat16
amp torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients
communication_data_type seq_parallel_communication_data_type zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer steps_per_print wall_clock_breakdown dump_state memory_breakdown flops_profiler
activation_checkpointing aio tensorboard wandb csv_monitor comet comms_logger elasticity autotuning
data_efficiency curriculum_learning compression_training checkpoint data_types dataloader_drop_last
disable_allgather disable_python_gc gradient_allreduce_op hybrid_engine pipeline sparse_attention eigenvalue
progressive_layer_drop quantize_training weight_quantization use_data_before_expert_parallelism
vocabulary_size compile nebula timers graph_harvesting tensor_parallel legacy_fusion lower_precision_safe_modules
managed_gradient_accumulation log_level zenflow mics_shard_size
""".split())
"""Top-level keys DeepSpeed reads (DeepSpeed silently ignores any other, so a typo would go unnoticed)."""


def check_ds_keys(config: dict, path: str) -> None:
    for key in config:
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--deepspeed {path}: unknown key {key!r}{hint}")


def check_output_dir(output_dir: str) -> None:
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"--output_dir {output_dir}: not writable ({error.strerror or error})") from None


def check_training_values(args: TrainArguments) -> None:
    """Loss weights within the range where they mean something."""
    if not 0.0 <= args.label_smoothing_factor < 1.0:
        raise ConfigError(f"--label_smoothing_factor={args.label_smoothing_factor!r} is not allowed: a number in [0, 1)")
    if args.consistency_weight < 0:
        raise ConfigError(f"--consistency_weight={args.consistency_weight!r} is not allowed: a number >= 0")


def _refuse_foreign_option(mixture: MixtureConfig, option: str, value) -> None:
    takers = [name for name, method in METHODS.items() if option in method.train_options]
    raise ConfigError(f"--{option}={value!r} is not allowed with --method {mixture.method}: it belongs to AdaMix's "
                      f"stochastic routing ({', '.join(takers)}); this method has no routes to draw")


def check_method_options(mixture: MixtureConfig, args: TrainArguments) -> None:
    """Training options of another family (config.Method.train_options) must keep their defaults."""
    defaults = TrainArguments()
    for option in sorted({o for method in METHODS.values() for o in method.train_options}):
        value = getattr(args, option)
        if option not in mixture.spec.train_options and value != getattr(defaults, option):
            _refuse_foreign_option(mixture, option, value)


def resolve_eval_modes(mixture: MixtureConfig, eval_modes: str | None) -> list[str]:
    """The routing modes evaluated at each eval of a stochastically routed mixture: merged weights (AdaMix,
    Sec. 3.3), a random expert per example, or the experts' average output. With one expert every mode is the
    same model, so it is evaluated once. Other families have none (their trainers evaluate the model as trained)."""
    if "eval_modes" not in mixture.spec.train_options:
        if eval_modes is not None:
            _refuse_foreign_option(mixture, "eval_modes", eval_modes)
        return []
    if eval_modes is None:
        return ["merged", "random"] if mixture.num_experts > 1 else ["merged"]
    modes = list(dict.fromkeys(m.strip() for m in eval_modes.split(",") if m.strip()))
    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown or not modes:
        raise ConfigError(f"--eval_modes={eval_modes!r} is not allowed: comma-separated from {', '.join(EVAL_MODES)}")
    return modes


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weight_files(directory: Path) -> None:
    """Weights are read from safetensors only: a pickled file can run code when it is loaded."""
    if list(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in directory.glob(pattern))
    if pickled:
        raise ConfigError(f"--model_name_or_path {directory}: weights only in pickle files ({', '.join(pickled[:3])}); "
                          "adamix_ds reads weights from safetensors only (convert them, e.g. load and "
                          "save_pretrained(safe_serialization=True) in a trusted environment)")


def check_quantization(model_args: ModelArguments, mixture: MixtureConfig) -> None:
    """A quantized base needs bitsandbytes and a method that leaves the base frozen."""
    if model_args.quantization_bit is None:
        return
    if mixture.spec.experts == "none":
        raise ConfigError(f"--quantization_bit={model_args.quantization_bit} with --method {mixture.method}: a "
                          "quantized base holds frozen integer codes that an optimizer cannot update; train a "
                          "mixture over it (e.g. --method adamix-lora or lora, the QLoRA arrangement) or drop "
                          "--quantization_bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"--quantization_bit needs bitsandbytes: pip install 'adamix_ds[quantization]' "
                          f"({error})") from None


def check_model(model_args: ModelArguments, mixture: MixtureConfig, gradient_checkpointing: bool = False) -> None:
    """Build a weightless (meta-device) copy of the model, which checks --attn_implementation and
    --gradient_checkpointing, and resolve the mixture's targets on it: no download, no memory."""
    name = model_args.model_name_or_path
    source = model_args.source
    if os.path.isdir(source.location) and not source.is_gguf:
        check_weight_files(Path(source.location))
    elif not (source.builtin or source.is_gguf):
        return  # a hub name: checked when it is loaded
    try:
        config = source.config(model_args.trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ConfigError(f"--model_name_or_path {name}: the model's code comes with it (auto_map); it runs only "
                          "with --trust_remote_code, so read it first") from None
    if mixture.spec.experts == "none" and getattr(config, "quantization_config", None) is not None:
        raise ConfigError(f"--model_name_or_path {name} is a quantized checkpoint (its config has a "
                          f"quantization_config) and --method {mixture.method} would train its weights; train a "
                          "mixture over it (e.g. --method adamix-lora or lora) or use the unquantized model")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **model_args.loading_options())
    except (ValueError, ImportError) as error:
        if not model_args.attn_implementation:
            raise
        raise ConfigError(f"--attn_implementation={model_args.attn_implementation!r}: {error}") from None
    if gradient_checkpointing:
        require_activation_checkpointing(model)
    if mixture.spec.experts != "none":
        resolve_targets(model, mixture)
