"""Reading WordNet 3.0's database files (Debian's wordnet-base: /usr/share/wordnet/data.{noun,verb,adj,adv}).

A data line is `offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt (pointer)... [frames] | gloss`
(WordNet's wndb(5)); w_cnt is two hexadecimal digits, p_cnt three decimal ones. The gloss is a
definition followed by quoted examples separated by "; ".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = ("noun", "verb", "adj", "adv")
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}

LEXICOGRAPHER_FILES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
"""The 45 lexicographer files (supersenses) by number, as listed in WordNet's lexnames(5); Debian's
wordnet-base does not ship the lexnames file itself."""

_EXAMPLE = re.compile(r';\s*"')


@dataclass(frozen=True)
class Synset:
    key: str
    """pos letter + offset, e.g. n00001740: unique across the four data files."""
    supersense: str
    pos: str
    words: tuple[str, ...]
    definition: str


def parse_line(line: str) -> Synset:
    """One synset from a data-file line (not a licence line, which starts with two spaces)."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    lemmas = fields[4:4 + 2 * w_cnt:2]
    # Adjective lemmas may carry a syntactic marker such as (p), (a) or (ip).
    words = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in lemmas)
    definition = _EXAMPLE.split(gloss.strip(), maxsplit=1)[0].strip().rstrip(";").strip()
    return Synset(key=f"{ss_type if ss_type != 's' else 'a'}{offset}", supersense=LEXICOGRAPHER_FILES[lex_filenum],
                  pos=POS_NAMES[ss_type], words=words, definition=definition)


def read_synsets(directory: str | Path = WORDNET_DIR) -> list[Synset]:
    """Every synset of the four data files, in file order."""
    directory = Path(directory)
    missing = [f"data.{p}" for p in POS_FILES if not (directory / f"data.{p}").is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: WordNet database files {missing} not found; on Debian or Ubuntu "
                                "`apt-get install wordnet-base` provides them")
    synsets = []
    for pos in POS_FILES:
        with open(directory / f"data.{pos}", encoding="utf-8", errors="replace") as handle:
            synsets += [parse_line(line) for line in handle if not line.startswith("  ") and line.strip()]
    return synsets
