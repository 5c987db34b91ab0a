"""The pretraining corpus: the prose of the Python documentation (Debian's python3-doc), as plain text.

Only the main body of each page is kept, and within it paragraphs, list items, headings and definition
terms; code blocks, navigation and the pilcrow links are dropped. HTML is parsed with BeautifulSoup
(lxml). Paragraphs are split into a training and a held-out file by a hash of the text, so the
split does not depend on the order in which pages are read.
"""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path

PYTHON_DOCS_GLOB = "/usr/share/doc/python3*/html"
BLOCKS = ("p", "li", "dt", "h1", "h2", "h3", "h4")
MIN_WORDS = 4


def docs_root() -> Path:
    roots = sorted(glob.glob(PYTHON_DOCS_GLOB))
    if not roots:
        raise FileNotFoundError(f"no Python documentation under {PYTHON_DOCS_GLOB}; on Debian or Ubuntu "
                                "`apt-get install python3-doc` provides it")
    return Path(roots[-1])


def page_paragraphs(html: str) -> list[str]:
    """The prose blocks of one documentation page, whitespace-normalised."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "lxml")
    body = soup.find("div", attrs={"role": "main"}) or soup.body
    if body is None:
        return []
    for noise in body.select("pre, script, style, a.headerlink, div.highlight"):
        noise.decompose()
    paragraphs = []
    for block in body.find_all(BLOCKS):
        if block.name == "li" and block.find("p"):
            continue  # its paragraphs are taken on their own
        text = re.sub(r"\s+", " ", block.get_text(" ", strip=True)).strip()
        text = re.sub(r" ([,.;:)])", r"\1", text).replace("( ", "(")
        if len(text.split()) >= MIN_WORDS:
            paragraphs.append(text)
    return paragraphs


def held_out(paragraph: str, percent: int) -> bool:
    return int(hashlib.sha256(paragraph.encode()).hexdigest()[:8], 16) % 100 < percent


def write_corpus(out_dir: Path, root: Path | None = None, eval_percent: int = 2) -> dict[str, Path]:
    """train.txt and validation.txt (a paragraph per line, duplicates removed) under out_dir."""
    root = root or docs_root()
    pages = sorted(p for p in root.rglob("*.html") if "_sources" not in p.parts)
    seen: set[str] = set()
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for page in pages:
        for paragraph in page_paragraphs(page.read_text(encoding="utf-8", errors="replace")):
            if paragraph in seen:
                continue
            seen.add(paragraph)
            splits["validation" if held_out(paragraph, eval_percent) else "train"].append(paragraph)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, paragraphs in splits.items():
        paths[split] = out_dir / f"{split}.txt"
        paths[split].write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    return paths
