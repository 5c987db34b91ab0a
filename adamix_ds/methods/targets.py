"""Where mixtures go: per-family defaults, the `all-linear` preset and user patterns, resolved to module names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ConfigError, MixtureConfig

_QV = ("q_proj", "v_proj")
LORA_DEFAULTS = {
    "llama": _QV,
    "mistral": _QV,
    "mixtral": _QV,
    "qwen2": _QV,
    "qwen3": _QV,
    "qwen2_moe": _QV,
    "qwen3_moe": _QV,
    "gemma": _QV,
    "gemma2": _QV,
    "gemma3_text": _QV,
    "phi": _QV,
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "opt": _QV,
}
"""LoRA targets when none are given: the query and value projections (the AdaMix/LoRA reference setting),
or the fused QKV projection where the family has one."""

_QKVOD = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
ROUTED_LORA_DEFAULTS = {family: _QKVOD for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                                                     "gemma2", "gemma3_text")}
"""Targets of the MoE-LoRA baselines when none are given: MoA's LoRA projections (q, k, v, o, MLP down)."""

ATTENTION_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward")
ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One insertion point: a linear layer for LoRA, or a block whose output an adapter follows."""

    name: str
    in_features: int
    out_features: int
    transposed: bool = False
    """True for GPT-2's Conv1D, whose weight is stored (in_features, out_features)."""


def linear_shape(module: nn.Module) -> tuple[int, int, bool] | None:
    """(in_features, out_features, transposed) of a linear layer; None for anything else.

    Read from attributes, not weight shapes, so it works on ZeRO-3 partitioned weights.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(module, Conv1D):
        return module.nx, module.nf, True
    return None


def _linear_layers(model: nn.Module) -> dict[str, tuple[int, int, bool]]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and module is not head:
            found[name] = shape
    return found


def _layer_pattern(names) -> list[str]:
    """Collapse layer numbers so that an error lists each kind of layer once."""
    return sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def resolve_lora_targets(model: nn.Module, config: MixtureConfig, defaults: dict = LORA_DEFAULTS) -> list[Target]:
    """The linear layers that get a LoRA mixture, in module order."""
    linears = _linear_layers(model)
    spec = config.target_modules
    if spec is None:
        model_type = model.config.model_type
        if model_type not in defaults:
            raise ConfigError(
                f"no default LoRA targets for model_type {model_type!r}; pass --target_modules "
                f"(suffixes, re:<regex> or {ALL_LINEAR}); linear layers: {', '.join(_layer_pattern(linears))}"
            )
        patterns = list(defaults[model_type])
    else:
        patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if patterns == [ALL_LINEAR]:
        chosen = list(linears)
    else:
        chosen = []
        for pattern in patterns:
            hits = [name for name in linears if _matches(name, pattern)]
            if not hits:
                raise ConfigError(
                    f"--target_modules pattern {pattern!r} matches no linear layer; linear layers: "
                    f"{', '.join(_layer_pattern(linears))} (or use {ALL_LINEAR})"
                )
            chosen.extend(hits)
    ordered = [name for name in linears if name in set(chosen)]
    return [Target(name, *linears[name]) for name in ordered]


def _blocks(model: nn.Module, block_names: tuple[str, ...]) -> list[str]:
    """Names of the per-layer blocks called one of block_names, e.g. model.layers.3.mlp."""
    pattern = re.compile(r"(.*\.)?\d+\.(" + "|".join(block_names) + r")")
    return [name for name, _ in model.named_modules() if pattern.fullmatch(name)]


def resolve_adapter_targets(model: nn.Module, config: MixtureConfig) -> list[Target]:
    """The blocks an adapter follows: every decoder layer's MLP, and its attention if asked."""
    hidden = model.config.hidden_size
    kinds = [MLP_NAMES] + ([ATTENTION_NAMES] if config.adapter_after_attention else [])
    names = []
    for block_names in kinds:
        found = _blocks(model, block_names)
        if not found:
            raise ConfigError(
                f"no decoder-layer block named {' or '.join(block_names)} in model_type "
                f"{model.config.model_type!r}; adapters follow each layer's MLP (and attention)"
            )
        names.extend(found)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return [Target(name, hidden, hidden) for name in sorted(names, key=order.__getitem__)]


def resolve_routed_targets(model: nn.Module, config: MixtureConfig) -> list[Target]:
    """The projections of the MoE-LoRA baselines (molora, hydralora, topk-lora)."""
    targets = resolve_lora_targets(model, config, ROUTED_LORA_DEFAULTS)
    fused = [t.name for t in targets if t.transposed]
    if fused:
        raise ConfigError(f"--method {config.method} supports nn.Linear targets only, not GPT-2's Conv1D ({fused[0]})")
    return targets


def layer_of(target_name: str) -> str:
    """The decoder-layer index in a module name ('model.layers.3.self_attn.q_proj' -> '3'), else 'other'."""
    match = _LAYER_INDEX.search(target_name)
    return match.group(1) if match else "other"
