"""What training data must look like, checked on every row before anything is tokenized or built.

A failure is one ConfigError that names the file, the line (jsonl), item (json array) or row (csv, parquet, txt,
a saved dataset), the column and what was expected; the entry points turn it into one line and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from ..config import ConfigError

FORMATS = ("auto", "text", "prompt_completion", "chat")
COLUMNS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",)}
ROLES = ("system", "user", "assistant", "tool")
"""The usual roles; a template may know others (developer, ipython, ...), so any non-empty name is accepted."""
TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def detect_format(columns: Iterable[str], requested: str, path: str) -> str:
    """The data format: the requested one, whose columns must be present, or (auto) the first whose are."""
    if requested not in FORMATS:
        raise ConfigError(f"--data_format={requested!r}: use one of {', '.join(FORMATS)}")
    found = set(columns)
    if requested == "auto":
        matches = [fmt for fmt in ("chat", "prompt_completion", "text") if set(COLUMNS[fmt]) <= found]
        if not matches:
            raise ConfigError(f"{path}: no known format; columns found {sorted(found)}; expected one of "
                              + ", ".join(f"{sorted(c)} ({f})" for f, c in COLUMNS.items()))
        return matches[0]
    if not set(COLUMNS[requested]) <= found:
        raise ConfigError(f"{path}: format {requested} needs columns {sorted(COLUMNS[requested])}; "
                          f"found {sorted(found)}")
    return requested


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def require_text(row: dict, column: str, where: str) -> None:
    """The row has `column`, a non-empty string; else one line naming where and what was found."""
    if column not in row:
        raise ConfigError(f"{where}: no column {column!r}")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: column {column!r} must be a non-empty string; found {_describe(value)}")


def _messages(value, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: column 'messages' must be a non-empty list of {{role, content}} objects; "
                          f"found {_describe(value)}")
    for turn, message in enumerate(value, start=1):
        at = f"{where}: column 'messages', message {turn}"
        if not isinstance(message, dict):
            raise ConfigError(f"{at} must be an object with 'role' and 'content'; found {_describe(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role.strip():
            raise ConfigError(f"{at}: 'role' must be a non-empty string (for example {', '.join(ROLES)}); found "
                              f"{_describe(role)}")
        content = message.get("content")
        if not isinstance(content, str) or (message["role"] == "assistant" and not content.strip()):
            wanted = "a non-empty string" if message["role"] == "assistant" else "a string"
            raise ConfigError(f"{at} ({message['role']}): 'content' must be {wanted}; found {_describe(content)}")
    if not any(m["role"] == "assistant" for m in value):
        raise ConfigError(f"{where}: a chat without an assistant turn (nothing to learn)")


def check_example(row: dict, fmt: str, where: str) -> None:
    """One example of format `fmt` (not auto): every column it uses, by type and content."""
    if fmt == "chat":
        _messages(row.get("messages"), where)
    else:
        for column in COLUMNS[fmt]:
            require_text(row, column, where)


def check_examples(rows: Iterable[tuple[str, dict]], fmt: str, where: str) -> int:
    """Check (where, row) pairs; the number of examples. No example at all is an error too (`where` names the
    source)."""
    count = 0
    for row_where, row in rows:
        check_example(row, fmt, row_where)
        count += 1
    if not count:
        raise ConfigError(f"{where}: no examples")
    return count


def check_utf8(file: Path, option: str) -> None:
    """Text files must be UTF-8: name the first line that is not."""
    with file.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(f"{option} {file}: line {number} is not UTF-8 text (byte 0x{line[error.start]:02x} "
                                  f"at column {error.start + 1}); save the file as UTF-8") from None


def _parse(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to read") from None


def json_rows(file: Path, option: str) -> Iterator[tuple[str, dict]]:
    """(where, object) of a JSON-lines file (where = line N), or of a .json file holding one array of objects
    (item N); a .json file that is not one JSON value is read as JSON lines."""
    if file.suffix == ".json":
        text = file.read_text(encoding="utf-8")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # JSON lines in a .json file
        except RecursionError:
            raise ConfigError(f"{option} {file} is nested too deeply to read") from None
        if isinstance(value, list):
            for number, item in enumerate(value, start=1):
                if not isinstance(item, dict):
                    raise ConfigError(f"{option} {file}: item {number} is not a JSON object; found {_describe(item)}")
                yield f"{option} {file}: item {number}", item
            return
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{option} {file}: a .json file holds an array of objects or one object per line; "
                              f"found {_describe(value)}")
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{option} {file}: line {number}"
            row = _parse(line, where)
            if not isinstance(row, dict):
                raise ConfigError(f"{where} is not a JSON object; found {_describe(row)}")
            yield where, row
