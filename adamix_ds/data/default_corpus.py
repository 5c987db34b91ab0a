"""The shipped base's pretraining text: restaurant descriptions without their attribute lists.

Each row describes one restaurant twice, in two independently drawn wordings, so that the base learns how
the task's sentences read and, from the second wording, to carry names and values over from earlier in
its context (what a fine-tuned model must do with the attribute list it is given). It never sees an
attribute list. The text is drawn by the default task's own generator (default_task.realise) from
meanings drawn with another seed; a row that contains a validation or test target anywhere is dropped,
so the default run's held-out scores stay held out. Generated here: no download, and no licence beyond
this repository's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import default_task

SEED = 7
"""Not the task's seed (2022): the meanings and sentences are drawn independently of its splits."""


def held_out_targets() -> set[str]:
    """The default task's validation and test completions, as sentences."""
    targets = set()
    for split in ("validation", "test"):
        for line in Path(default_task.data_file(split)).read_text(encoding="utf-8").splitlines():
            targets.add(json.loads(line)["completion"].strip())
    return targets


def pretraining_rows(count: int, seed: int = SEED) -> tuple[list[str], int]:
    """`count` rows of two wordings of one meaning, none a held-out target, and how many drawn rows were dropped."""
    rng, held_out = random.Random(seed), held_out_targets()
    rows, dropped = [], 0
    while len(rows) < count:
        meaning = default_task.draw_meaning(rng)
        row = " ".join(default_task.realise(meaning, rng) for _ in range(2))
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
