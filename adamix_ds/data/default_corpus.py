"""The shipped base's pretraining text: a restaurant's facts as a settings line, then two descriptions of it.

A row reads `name=The Mill, type=restaurant, area=city centre, price=£20-25.` followed by two independently
drawn wordings of the same meaning: the base learns how the task's sentences read and to state every value
it was given, copying it from earlier in its context (what a fine-tuned model must do with the task's
attribute list). The settings line is not the task's notation: other key names (type, price, rating,
family friendly), `=` where the task has brackets, shuffled order, no `=>`; the fine-tune teaches that.
Written right after `=`, a value has the same tokens as inside the task's brackets (no word-start mark),
which is what lets a small model copy it. The sentences come from the default task's own generator
(default_task.realise), on meanings drawn with another seed; a row that contains a validation or test
target anywhere is dropped, so the default run's held-out scores stay held out. Generated here: no
download, and no licence beyond this repository's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import default_task

SEED = 7
"""Not the task's seed (2022): the meanings and sentences are drawn independently of its splits."""


KEYS = {"name": "name", "eatType": "type", "food": "food", "priceRange": "price", "customer rating": "rating",
        "area": "area", "familyFriendly": "family friendly", "near": "near"}
"""The settings line's key for each of the task's attributes."""


def settings_line(meaning: dict, rng: random.Random) -> str:
    """The meaning as `name=..., type=..., ...`: name and type first, the other facts in a drawn order."""
    first, rest = list(meaning.items())[:2], list(meaning.items())[2:]
    rng.shuffle(rest)
    return ", ".join(f"{KEYS[key]}={value}" for key, value in first + rest) + "."


def held_out_targets() -> set[str]:
    """The default task's validation and test completions, as sentences."""
    targets = set()
    for split in ("validation", "test"):
        for line in Path(default_task.data_file(split)).read_text(encoding="utf-8").splitlines():
            targets.add(json.loads(line)["completion"].strip())
    return targets


def pretraining_rows(count: int, seed: int = SEED) -> tuple[list[str], int]:
    """`count` rows (a settings line and two wordings of its meaning), none holding a held-out target, and how
    many drawn rows were dropped."""
    rng, held_out = random.Random(seed), held_out_targets()
    rows, dropped = [], 0
    while len(rows) < count:
        meaning = default_task.draw_meaning(rng)
        row = " ".join([settings_line(meaning, rng)] + [default_task.realise(meaning, rng) for _ in range(2)])
        if any(target in row for target in held_out):  # a short target can be a longer text's first sentence
            dropped += 1
            continue
        rows.append(row)
    return rows, dropped


def write_text_rows(rows: list[str], path: Path) -> Path:
    """The trainer's text format: a jsonl `text` column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
