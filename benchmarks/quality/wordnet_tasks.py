"""The two downstream tasks built from WordNet, and their synset splits.

- supersense: a synset's definition -> its lexicographer file (45 classes), scored by accuracy;
- definition: a word and its part of speech -> the synset's definition, scored by BLEU and ROUGE-L.

The splits are by synset: every synset is in exactly one of train, dev and test for both tasks, so no
definition seen in training is asked for or classified at test time. They are drawn once with a fixed
seed, written to splits.json together with a digest of the WordNet files, and reused from there.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from .wordnet import POS_FILES, WORDNET_DIR, Synset, read_synsets

TASKS = ("supersense", "definition")
SPLIT_SEED = 20261123
HELD_OUT = {"dev": 2000, "test": 4000}
"""Synsets reserved for dev and test; a preset uses a prefix of each list."""


def wordnet_digest(directory: str | Path = WORDNET_DIR) -> str:
    digest = hashlib.sha256()
    for pos in POS_FILES:
        digest.update((Path(directory) / f"data.{pos}").read_bytes())
    return digest.hexdigest()


def synset_splits(path: Path, directory: str | Path = WORDNET_DIR, held_out: dict | None = None) -> dict[str, list[str]]:
    """{train, dev, test: synset keys in a fixed random order}: read from `path`, or drawn and written there."""
    digest = wordnet_digest(directory)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["wordnet_sha256"] != digest:
            raise ValueError(f"{path} was drawn from other WordNet files (sha256 {saved['wordnet_sha256'][:12]}, "
                             f"these are {digest[:12]}); remove it to draw new splits")
        return saved["splits"]
    keys = sorted(s.key for s in read_synsets(directory))
    random.Random(SPLIT_SEED).shuffle(keys)
    held_out = held_out or HELD_OUT
    dev_end = held_out["dev"]
    test_end = dev_end + held_out["test"]
    splits = {"train": keys[test_end:], "dev": keys[:dev_end], "test": keys[dev_end:test_end]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"seed": SPLIT_SEED, "wordnet_sha256": digest, "splits": splits}) + "\n")
    tmp.replace(path)
    return splits


def example(task: str, synset: Synset) -> dict:
    """A prompt/completion row (the trainer's prompt_completion format: loss on the completion only)."""
    if task == "supersense":
        return {"prompt": f"Definition: {synset.definition} | Supersense:", "completion": f" {synset.supersense}",
                "key": synset.key}
    if task == "definition":
        return {"prompt": f"Word: {synset.words[0]} ({synset.pos}) | Definition:",
                "completion": f" {synset.definition}", "key": synset.key}
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def write_task_files(out_dir: Path, sizes: dict[str, int], splits_path: Path,
                     directory: str | Path = WORDNET_DIR) -> dict[str, dict[str, Path]]:
    """{task: {split: jsonl path}} with the first sizes[split] synsets of each split."""
    splits = synset_splits(splits_path, directory)
    for split, size in sizes.items():
        if size > len(splits[split]):
            raise ValueError(f"{split}: {size} examples asked, the split holds {len(splits[split])}")
    by_key = {s.key: s for s in read_synsets(directory)}
    files: dict[str, dict[str, Path]] = {}
    for task in TASKS:
        (out_dir / task).mkdir(parents=True, exist_ok=True)
        files[task] = {}
        for split, size in sizes.items():
            path = out_dir / task / f"{split}.jsonl"
            rows = [example(task, by_key[key]) for key in splits[split][:size]]
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            files[task][split] = path
    return files
