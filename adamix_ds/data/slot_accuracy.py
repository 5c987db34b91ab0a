"""Slot accuracy of the default task: the share of the input's attribute values that the output realises.

A model that writes fluent sentences about the wrong restaurant scores low; one that lists every value
scores 100 whatever its grammar, so the default run reports it beside the eval loss, not instead of it.
"""

from __future__ import annotations

import re

SLOT = re.compile(r"([A-Za-z ]+)\[([^\]]*)\]")


def meaning_of(prompt: str) -> dict[str, str]:
    """The attributes of a default-task prompt, e.g. 'name[Aromi], food[Chinese] =>' -> {name: Aromi, ...}."""
    return {key.strip(): value for key, value in SLOT.findall(prompt)}


def realised(key: str, value: str, text: str) -> bool:
    """Whether `text` states this attribute: its value verbatim (any case); familyFriendly as (not) family friendly."""
    text = text.lower()
    if key == "familyFriendly":
        negated = "not family friendly" in text or "not family-friendly" in text
        return negated if value == "no" else ("family friendly" in text or "family-friendly" in text) and not negated
    return value.lower() in text


def slot_accuracy(prompts: list[str], outputs: list[str]) -> float:
    """Percent of all attribute values over `prompts` that the matching outputs realise."""
    slots = hits = 0
    for prompt, output in zip(prompts, outputs, strict=True):
        for key, value in meaning_of(prompt).items():
            slots += 1
            hits += realised(key, value, output)
    if slots == 0:
        raise ValueError("no attribute in the prompts: slot accuracy needs the default task's inputs")
    return 100.0 * hits / slots
