"""A small offline workspace for trainer tests: data-to-text examples, a sentencepiece tokenizer trained on
them, and a tiny Llama saved as a Hugging Face model directory (so every run starts from the same base)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Aromi", "Bibimbap House", "The Cricketers", "Fitzbillies", "Green Man", "Loch Fyne", "The Mill", "Zizzi"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese"]
AREAS = ["city centre", "riverside"]
RATINGS = ["low", "average", "high"]


@dataclass
class Workspace:
    root: Path
    data: Path
    tokenizer: Path
    base: Path


def build_workspace(root: Path, family: str = "llama", examples: int = 240) -> Workspace:
    import sentencepiece as spm

    from adamix_ds.arguments import ModelArguments
    from adamix_ds.builtin_models import tiny_model
    from adamix_ds.data.tokenizer import load_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for _ in range(examples):
        n, f, a, r = rng.choice(NAMES), rng.choice(FOODS), rng.choice(AREAS), rng.choice(RATINGS)
        rows.append({"prompt": f"name[{n}] food[{f}] area[{a}] rating[{r}] =>",
                     "completion": f" {n} serves {f} food in the {a} and has a {r} customer rating."})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(r["prompt"] + r["completion"] for r in rows))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "sp"), vocab_size=200,
                                   model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    tokenizer = load_tokenizer(ModelArguments(tokenizer_name_or_path=str(root / "sp.model")))
    base = root / f"base-{family}"
    tiny_model(family, vocab_size=len(tokenizer), seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    return Workspace(root=root, data=data, tokenizer=root / "sp.model", base=base)
