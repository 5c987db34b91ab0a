"""The default task's tokenizer writes a value nearly the same way inside an attribute list and in a sentence."""

import json

from adamix_ds.arguments import ModelArguments
from adamix_ds.data import default_task
from adamix_ds.data.slot_accuracy import meaning_of
from adamix_ds.data.tokenizer import load_tokenizer


def _bare(pieces):
    """Pieces without sentencepiece's word-start mark, which a value right after '[' cannot have."""
    return [p.removeprefix("▁") for p in pieces if p != "▁"]


def test_brackets_stay_single_pieces_and_values_keep_their_pieces():
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path="tiny:llama"))

    def pieces_of(text):
        return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])

    same, differ = set(), set()
    for line in open(default_task.data_file("validation"), encoding="utf-8"):
        prompt = json.loads(line)["prompt"]
        pieces, meaning = pieces_of(prompt), meaning_of(prompt)
        opens = [i for i, piece in enumerate(pieces) if piece == "["]
        closes = [i for i, piece in enumerate(pieces) if piece == "]"]
        assert len(opens) == len(closes) == len(meaning), pieces  # no bracket merged into a neighbouring piece
        for start, end, (key, value) in zip(opens, closes, meaning.items(), strict=True):
            if key == "familyFriendly":  # yes/no: stated as (not) family friendly, never copied
                continue
            in_sentence = pieces_of(f"is {value} and")[1:-1]
            (same if _bare(pieces[start + 1:end]) == _bare(in_sentence) else differ).add(value)
    # The old tokenizer merged '[3', '£20],' and '],'; now only a rare name's first letters split differently.
    assert len(same) >= 60 and len(differ) <= 3, differ
