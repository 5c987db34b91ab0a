"""The study's own base: a sentencepiece tokenizer from the documentation corpus and that corpus as text rows; the
initial model (training.initial_model) is then pretrained with the trainer's `--method full` under ZeRO-3."""

from __future__ import annotations

import json
import os
from pathlib import Path


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


def text_rows(text_file: Path, out: Path) -> Path:
    """The trainer's text format (a jsonl `text` column), one paragraph per row."""
    lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines))
    return out
