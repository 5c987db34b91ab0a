"""Reading raw examples with `datasets`: local files, `save_to_disk` directories, and hub names.

Bad input stops here, before any model is built, with a ConfigError that names the file, the line, item or
row, and the column (data/validation.py says what is expected); the entry points turn it into one line and
exit code 2. JSON files are checked line by line before `datasets` reads them, since `datasets` reports a
broken line or a value of the wrong type without saying where.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import datasets

from ..config import ConfigError
from .validation import COLUMNS, TEXT_SUFFIXES, check_examples, check_utf8, detect_format, json_rows

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _load_local(local: Path, option: str) -> datasets.Dataset:
    if local.suffix == ".txt":  # one example per line; blank lines carry no text
        lines = [line.rstrip("\r\n") for line in local.read_text(encoding="utf-8").splitlines()]
        return datasets.Dataset.from_dict({"text": [line for line in lines if line.strip()]})
    try:
        return datasets.load_dataset(LOADERS[local.suffix], data_files=str(local), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise ConfigError(f"{option} {local}: cannot be read ({type(error).__name__}: {error})") from None


def _load_directory(local: Path, option: str) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(local))
    except FileNotFoundError as error:
        raise ConfigError(f"{option} {local}: a directory, but not one written by save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{option} {local}: a DatasetDict without a 'train' split (splits: {list(loaded)})")
        loaded = loaded["train"]
    return loaded


def _used(row: dict, fmt: str) -> dict:
    """The columns a format uses, so that other keys of any type or shape cannot break reading. Chat messages travel
    as their JSON text (tokenization reads it back), so that every key a template may use (name, tool_calls, ...)
    survives, whatever shape it has in each message."""
    if fmt == "chat":
        return {"messages": json.dumps(row["messages"], ensure_ascii=False)}
    return {column: row[column] for column in COLUMNS[fmt]}


def _read_json(file: Path, requested_format: str, option: str) -> tuple[datasets.Dataset, str]:
    """JSON lines or a JSON array, read three times without holding the rows: for the columns (the format), for
    every row's check, and into Arrow."""
    columns: set[str] = set()
    rows = 0
    for _, row in json_rows(file, option):
        columns.update(row)
        rows += 1
    if not rows:
        raise ConfigError(f"{option} {file}: no examples (no JSON object in it)")
    fmt = detect_format(columns, requested_format, str(file))
    check_examples(json_rows(file, option), fmt, f"{option} {file}")
    stat = file.stat()  # keys datasets' generator cache, so that a changed file is read again
    dataset = datasets.Dataset.from_generator(
        _used_rows, keep_in_memory=True,
        gen_kwargs={"file": str(file), "fmt": fmt, "option": option, "version": (stat.st_size, stat.st_mtime_ns)})
    return dataset, fmt


def _used_rows(file: str, fmt: str, option: str, version: tuple) -> Iterator[dict]:
    """The checked rows' used columns, streamed into Arrow (never all of them as Python objects at once)."""
    for _, row in json_rows(Path(file), option):
        yield _used(row, fmt)


def read_examples(path: str, requested_format: str, option: str = "--data_path") -> tuple[datasets.Dataset, str]:
    """(the examples at `path`, their format): a file by its suffix, a save_to_disk directory, or a hub dataset
    name; every row checked for the format's columns before it is returned."""
    local = Path(path)
    if local.is_dir():
        dataset = _load_directory(local, option)
    elif local.suffix in LOADERS:
        if not local.is_file():
            raise ConfigError(f"{option} {path}: file not found")
        if local.stat().st_size == 0:
            raise ConfigError(f"{option} {path}: no examples (the file is empty)")
        if local.suffix in TEXT_SUFFIXES:
            check_utf8(local, option)
        if local.suffix in (".jsonl", ".json"):
            return _read_json(local, requested_format, option)
        dataset = _load_local(local, option)
    elif local.suffix or local.exists() or "/" not in path:
        raise ConfigError(
            f"{option} {path}: not found, or an unknown file type; use a {', '.join(LOADERS)} file, "
            "a save_to_disk directory or a hub dataset name (owner/name)"
        )
    else:
        try:
            dataset = datasets.load_dataset(path, split="train")
        except Exception as error:
            raise ConfigError(f"{option} {path}: not a local file and not loadable from the hub ({error})") from None
    fmt = detect_format(dataset.column_names, requested_format, path)
    check_examples(((f"{option} {path}: row {i + 1}", row) for i, row in enumerate(dataset)), fmt, f"{option} {path}")
    return dataset, fmt
