"""Reading raw examples with `datasets`: local files, `save_to_disk` directories, and hub names.

Bad input stops here, before any model is built, with a ConfigError that names the file, the line or
the columns found (the entry points turn it into one line and exit code 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from ..config import ConfigError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _check_json_lines(file: Path, option: str) -> None:
    """datasets reports a broken JSON line without its number; find it first."""
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{option} {file}: line {number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{option} {file}: line {number} is not a JSON object")


def read_dataset(path: str, option: str = "--data_path") -> datasets.Dataset:
    """The examples at `path`: a file by its suffix, a save_to_disk directory, or a hub dataset name."""
    local = Path(path)
    if local.is_dir():
        try:
            loaded = datasets.load_from_disk(str(local))
        except FileNotFoundError as error:
            raise ConfigError(f"{option} {path}: a directory, but not one written by save_to_disk ({error})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ConfigError(f"{option} {path}: a DatasetDict without a 'train' split (splits: {list(loaded)})")
            loaded = loaded["train"]
        return loaded
    if local.suffix in LOADERS:
        if not local.is_file():
            raise ConfigError(f"{option} {path}: file not found")
        if local.suffix == ".jsonl":
            _check_json_lines(local, option)
        try:
            return datasets.load_dataset(LOADERS[local.suffix], data_files=str(local), split="train")
        except Exception as error:  # datasets raises many types for unreadable files
            raise ConfigError(f"{option} {path}: cannot be read ({type(error).__name__}: {error})") from None
    if local.suffix or local.exists() or "/" not in path:
        raise ConfigError(
            f"{option} {path}: not found, or an unknown file type; use a {', '.join(LOADERS)} file, "
            "a save_to_disk directory or a hub dataset name (owner/name)"
        )
    try:
        return datasets.load_dataset(path, split="train")
    except Exception as error:
        raise ConfigError(f"{option} {path}: not a local file and not loadable from the hub ({error})") from None
