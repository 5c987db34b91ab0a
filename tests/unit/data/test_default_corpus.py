"""The shipped base's pretraining text: reproducible, and free of the default task's held-out targets."""

import json
import random

import pytest

from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import SHIPPED_BASES, shipped_base
from adamix_ds.config import ConfigError
from adamix_ds.data import default_task
from adamix_ds.data.default_corpus import held_out_targets, pretraining_rows


def test_no_held_out_target_and_the_same_text_every_time():
    rows, dropped = pretraining_rows(10_000)
    again, _ = pretraining_rows(10_000)
    assert rows == again and len(rows) == 10_000 and dropped > 0
    targets = {r["completion"].strip() for split in ("validation", "test") for r in default_task.generate()[split]}
    assert targets == held_out_targets() and len(targets) > 300
    assert not any(target in row for row in rows for target in targets)
    # Drawn again from the task's generator: exactly the rows containing a held-out target were dropped.
    rng, kept, seen_dropped = random.Random(7), [], 0
    for _ in range(10_000 + dropped):
        meaning = default_task.draw_meaning(rng)
        row = " ".join(default_task.realise(meaning, rng) for _ in range(2))
        if any(target in row for target in targets):
            seen_dropped += 1
        else:
            kept.append(row)
    assert kept == rows and seen_dropped == dropped


def test_two_wordings_of_one_meaning_and_no_attribute_lists():
    rows, _ = pretraining_rows(2000)
    assert not any("[" in row or "=>" in row for row in rows)
    for row in rows[:200]:
        first, second = row.split(". ", 1)[0], row
        name = next(n for n in default_task.NAMES if n in first)
        assert second.count(name) == 2, row  # the second wording names the same restaurant


def test_the_shipped_name_is_resolved_to_the_package_directory(tmp_path, monkeypatch):
    name = "shipped:restaurants"
    assert ModelArguments(model_name_or_path="tiny:llama").model_name_or_path == "tiny:llama"
    monkeypatch.setitem(SHIPPED_BASES, name, tmp_path / "missing")
    with pytest.raises(ConfigError, match="launch/pretrain_default_base.py"):
        ModelArguments(model_name_or_path=name)
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "config.json").write_text(json.dumps({}))
    assert shipped_base(name) == str(tmp_path / "missing")
    assert ModelArguments(model_name_or_path=name).model_name_or_path == str(tmp_path / "missing")
