"""The study's own base: a sentencepiece tokenizer and a randomly initialised Llama, both from the
documentation corpus, then pretrained with the trainer's `--method full` under ZeRO-3."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.tokenizer import SENTENCEPIECE_CONFIG


def train_tokenizer(corpus: Path, out_dir: Path, vocab_size: int) -> Path:
    """A BPE sentencepiece model (ids 0-3: pad, bos, eos, unk; byte fallback, so no text is unknown)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / f"spm-{vocab_size}.model"
    if model.is_file():
        return model
    prefix = out_dir / f"spm-{vocab_size}.{os.getpid()}"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe", pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, character_coverage=1.0, byte_fallback=True, input_sentence_size=500_000,
        shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2,
    )
    os.replace(f"{prefix}.model", model)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return model


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


def text_rows(text_file: Path, out: Path) -> Path:
    """The trainer's text format (a jsonl `text` column), one paragraph per row."""
    lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines))
    return out
