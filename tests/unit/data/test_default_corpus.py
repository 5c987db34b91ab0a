"""The shipped base's pretraining text: reproducible, free of the default task's held-out targets, and never in
the task's notation."""

import json
import random

import pytest

from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import SHIPPED_BASES, shipped_base
from adamix_ds.config import ConfigError
from adamix_ds.data import default_task
from adamix_ds.data.default_corpus import held_out_targets, pretraining_rows, settings_line


def test_no_held_out_target_and_the_same_text_every_time():
    assert pretraining_rows(2000) == pretraining_rows(2000)
    rows, dropped = pretraining_rows(30_000)  # as many as the shipped base's corpus
    assert len(rows) == 30_000 and dropped > 0
    targets = {r["completion"].strip() for split in ("validation", "test") for r in default_task.generate()[split]}
    assert targets == held_out_targets() and len(targets) > 300
    # Drawn again from the task's generator: exactly the rows containing a held-out target were dropped, so no
    # kept row contains one.
    rng, kept, seen_dropped = random.Random(7), [], 0
    for _ in range(30_000 + dropped):
        meaning = default_task.draw_meaning(rng)
        row = " ".join([settings_line(meaning, rng)] + [default_task.realise(meaning, rng) for _ in range(2)])
        if any(target in row for target in targets):
            seen_dropped += 1
        else:
            kept.append(row)
    assert kept == rows and seen_dropped == dropped


def test_a_settings_line_then_two_descriptions_stating_every_value():
    rows, _ = pretraining_rows(2000)
    assert not any("[" in row or "]" in row or "=>" in row for row in rows)  # never the task's notation
    for row in rows:
        line, descriptions = row.split(". ", 1)
        facts = dict(item.split("=") for item in line.split(", "))
        assert list(facts)[:2] == ["name", "type"] and set(facts) <= {
            "name", "type", "food", "price", "rating", "area", "family friendly", "near"}, line
        for key, value in facts.items():
            said = "not family friendly" if value == "no" else "family friendly" if value == "yes" else value
            assert descriptions.count(said) >= 2, (key, row)  # each wording states each fact


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
