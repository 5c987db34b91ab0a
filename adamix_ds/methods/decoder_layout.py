"""Where MoA's experts sit in a Llama-family decoder layer, read from module names and the model config."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config import ConfigError

MOA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
"""Decoders whose layers have input_layernorm, self_attn.{q,k,v,o}_proj with rotary queries, and mlp.down_proj."""

PROJECTIONS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "down": "mlp.down_proj"}


@dataclass(frozen=True)
class DecoderLayerSpec:
    """One decoder layer: its module name and the widths its experts need."""

    name: str
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool
    """True where the attention normalises queries and keys per head (Qwen3's q_norm / k_norm)."""

    def projection_shape(self, expert: str) -> tuple[int, int]:
        """(in_features, out_features) of the frozen projection a LoRA expert adapts."""
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q": (self.hidden, q), "k": (self.hidden, kv), "v": (self.hidden, kv), "o": (q, self.hidden),
                "down": (self.intermediate, self.hidden)}[expert]


def decoder_layers(model: nn.Module) -> list[DecoderLayerSpec]:
    """The decoder layers of a supported family, in order; a ConfigError names what is not supported."""
    config = model.config
    if config.model_type not in MOA_FAMILIES:
        raise ConfigError(
            f"moa-* needs a Llama-family decoder ({', '.join(MOA_FAMILIES)}): the router reads each layer's normed "
            f"input and the prompt expert joins its rotary attention; model_type {config.model_type!r} is not one. "
            "The homogeneous baselines (molora, hydralora, topk-lora) work on any family with --target_modules."
        )
    modules = dict(model.named_modules())
    pattern = re.compile(r"(.*\.)?layers\.\d+")
    names = [n for n in modules if pattern.fullmatch(n) and f"{n}.self_attn.q_proj" in modules]
    if not names:
        raise ConfigError(f"found no decoder layers (…layers.N with self_attn.q_proj) in model_type {config.model_type!r}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return [
        DecoderLayerSpec(name=n, hidden=config.hidden_size, intermediate=config.intermediate_size, num_heads=heads,
                         num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                         qk_norm=f"{n}.self_attn.q_norm" in modules)
        for n in names
    ]
