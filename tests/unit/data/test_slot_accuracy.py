"""Slot accuracy against hand-counted examples."""

import pytest

from adamix_ds.data import default_task
from adamix_ds.data.slot_accuracy import meaning_of, slot_accuracy

PROMPT = "name[The Mill], eatType[pub], food[fast food], familyFriendly[no], near[Café Rouge] =>"


def test_meaning_of_a_prompt():
    assert meaning_of(PROMPT) == {"name": "The Mill", "eatType": "pub", "food": "fast food",
                                  "familyFriendly": "no", "near": "Café Rouge"}


@pytest.mark.parametrize("output, hits", [
    ("The Mill is a pub that serves fast food food. It is not family friendly and is near Café Rouge.", 5),
    ("The Mill is a pub that serves fast food food. It is family friendly.", 3),  # family wrong, near missing
    ("the mill is a PUB near café rouge", 3),  # any case; food and family missing
    ("is a is a is a", 0),
])
def test_hand_counted_outputs(output, hits):
    assert slot_accuracy([PROMPT], [output]) == pytest.approx(100 * hits / 5)


def test_family_friendly_yes_is_not_met_by_its_negation():
    prompt = "name[Aromi], eatType[restaurant], familyFriendly[yes] =>"
    assert slot_accuracy([prompt], ["Aromi is a restaurant that is not family friendly."]) == pytest.approx(200 / 3)
    assert slot_accuracy([prompt], ["Aromi is a restaurant that is family friendly."]) == 100


def test_the_task_references_score_100_and_are_pooled_over_slots():
    rows = default_task.generate()["validation"][:50]
    assert slot_accuracy([r["prompt"] for r in rows], [r["completion"] for r in rows]) == 100
    short, long_ = "name[A], eatType[pub] =>", PROMPT
    # 2 of 2 and 0 of 5: pooled over the 7 slots, not averaged per input.
    assert slot_accuracy([short, long_], ["A is a pub.", ""]) == pytest.approx(200 / 7)
