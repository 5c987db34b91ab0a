"""A model directory to pretrain from: a Llama config, random weights drawn with a seed, and a sentencepiece
tokenizer. Used for the shipped default base and the quality study's base, both pretrained with `--method full`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.tokenizer import SENTENCEPIECE_CONFIG


def write_initial_model(out_dir: Path, tokenizer_model: Path, model_config: dict, vocab_size: int, seed: int) -> Path:
    """A Hugging Face directory: Llama config, random weights drawn with `seed`, and the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out_dir / "config.json").is_file():
        return out_dir
    config = AutoConfig.for_model("llama", vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **model_config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    (tmp / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (tmp / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG) + "\n")
    os.replace(tmp, out_dir)
    return out_dir
