"""Fuzzing the data path: seeded mutations of valid jsonl, json, csv, parquet and txt files.

Every file must end in examples (the run would train) or in one ConfigError line that names the file and, where
the mutation hit one row, that row's line, item or row and column; never another exception, and within a time
bound. The same property through the real launcher on 2 ranks: tests/launched/test_bad_input.py.
"""

import csv
import io
import json
import random
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adamix_ds.arguments import DataArguments, ModelArguments
from adamix_ds.config import ConfigError
from adamix_ds.data.tokenization import tokenize
from adamix_ds.data.tokenizer import load_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SECONDS_PER_FILE = 20.0
WRONG_VALUES = [None, 7, 2.5, True, [], ["a", "b"], {"x": 1}, "", "   "]


@dataclass
class Case:
    name: str
    content: bytes
    expect: str
    """ok, error (a refusal naming `where`), or either (the run may train or refuse)."""
    where: str = ""
    chat_template: bool = True


def _valid_rows(fmt: str, rng: random.Random, n: int) -> list[dict]:
    words = ["The Mill", "serves", "Indian food", "in the riverside", "and is cheap", "Zizzi", "is a pub"]
    phrase = lambda: " ".join(rng.sample(words, 3))  # noqa: E731
    if fmt == "text":
        return [{"text": phrase()} for _ in range(n)]
    if fmt == "prompt_completion":
        return [{"prompt": phrase() + " =>", "completion": " " + phrase()} for _ in range(n)]
    return [{"messages": [{"role": "user", "content": phrase()}, {"role": "assistant", "content": phrase()}]}
            for _ in range(n)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _jsonl_cases(rng: random.Random) -> list[Case]:
    cases = []
    for index in range(120):
        fmt = rng.choice(["text", "prompt_completion", "chat"])
        rows = _valid_rows(fmt, rng, rng.randint(2, 6))
        k = rng.randrange(len(rows))
        line = k + 1
        column = {"text": ["text"], "prompt_completion": ["prompt", "completion"], "chat": ["messages"]}[fmt]
        kind = rng.choice(["wrong_type", "missing", "extra", "non_utf8", "truncated", "huge", "nested", "not_object",
                           "chat_content", "chat_role", "chat_string", "blank_lines", "valid"])
        name = f"case{index:03d}-{fmt}-{kind}.jsonl"
        expect, where = "error", f"line {line}"
        if kind == "wrong_type":
            col = rng.choice(column)
            rows[k][col] = rng.choice(WRONG_VALUES)
        elif kind == "missing":
            del rows[k][rng.choice(column)]
            where = ""  # the row lacks a column the others have (or, alone, the format has none)
        elif kind == "extra":
            rows[k][rng.choice(["id", "meta", "score"])] = rng.choice(WRONG_VALUES + ["x" * 50, {"a": [1, {"b": 2}]}])
            expect, where = "ok", ""
        elif kind == "huge":
            rows[k][column[-1]] = rows[k][column[-1]] if fmt == "chat" else "big " * 40_000
            expect, where = "ok", ""
        elif kind == "nested":
            depth = rng.choice([30, 200_000])
            rows[k]["meta"] = "DEEP"
            content = _jsonl(rows).replace(b'"DEEP"', b"[" * depth + b"]" * depth)
            cases.append(Case(name, content, "ok" if depth == 30 else "error", "" if depth == 30 else where))
            continue
        elif kind == "not_object":
            content = _jsonl(rows).splitlines(keepends=True)
            content[k] = json.dumps(rng.choice([[1, 2], 3, "text", None])).encode() + b"\n"
            cases.append(Case(name, b"".join(content), "error", where))
            continue
        elif kind in ("non_utf8", "truncated"):
            lines = _jsonl(rows).splitlines(keepends=True)
            if kind == "non_utf8":
                cut = rng.randrange(1, len(lines[k]) - 1)
                lines[k] = lines[k][:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\x80\x80"]) + lines[k][cut:]
            else:
                lines[k] = lines[k][: rng.randrange(1, len(lines[k]) - 2)] + b"\n"
            cases.append(Case(name, b"".join(lines), "error", where))
            continue
        elif kind.startswith("chat_") and fmt == "chat":
            message = rows[k]["messages"][1]
            if kind == "chat_content":
                message.pop("content") if rng.random() < 0.5 else message.update(content=rng.choice([None, 3, ""]))
            elif kind == "chat_role":
                message["role"] = rng.choice([None, 1, "", "  ", ["user"]])
            else:
                rows[k]["messages"] = "user: hello"
        elif kind == "blank_lines":
            content = b"\n\n".join(_jsonl(rows).splitlines()) + b"\n\n   \n"
            cases.append(Case(name, content, "ok"))
            continue
        else:
            expect, where = "ok", ""
        cases.append(Case(name, _jsonl(rows), expect, where))
    cases.append(Case("empty.jsonl", b"", "error"))
    cases.append(Case("only-blank.jsonl", b"\n \n\n", "error"))
    cases.append(Case("no-template.jsonl", _jsonl(_valid_rows("chat", rng, 2)), "error", chat_template=False))
    return cases


def _json_cases(rng: random.Random) -> list[Case]:
    cases = []
    for index in range(30):
        fmt = rng.choice(["text", "prompt_completion", "chat"])
        rows = _valid_rows(fmt, rng, rng.randint(2, 5))
        kind = rng.choice(["valid", "wrong_type", "not_object", "lines", "scalar", "truncated"])
        k = rng.randrange(len(rows))
        name = f"json{index:03d}-{fmt}-{kind}.json"
        if kind == "valid":
            cases.append(Case(name, json.dumps(rows).encode(), "ok"))
        elif kind == "wrong_type":
            rows[k][next(iter(rows[k]))] = rng.choice(WRONG_VALUES)
            cases.append(Case(name, json.dumps(rows).encode(), "error", f"item {k + 1}"))
        elif kind == "not_object":
            rows[k] = rng.choice([1, "row", [1]])
            cases.append(Case(name, json.dumps(rows).encode(), "error", f"item {k + 1}"))
        elif kind == "lines":  # JSON lines in a .json file
            cases.append(Case(name, _jsonl(rows), "ok"))
        elif kind == "scalar":
            cases.append(Case(name, json.dumps(rng.choice([5, "text", None])).encode(), "error"))
        else:
            text = json.dumps(rows).encode()
            cases.append(Case(name, text[: rng.randrange(1, len(text) - 1)], "error"))
    return cases


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return out.getvalue().encode()


def _csv_cases(rng: random.Random) -> list[Case]:
    cases = []
    for index in range(25):
        fmt = rng.choice(["text", "prompt_completion"])
        rows = _valid_rows(fmt, rng, rng.randint(2, 5))
        columns = list(rows[0])
        kind = rng.choice(["valid", "empty_cell", "numbers", "non_utf8", "extra_column", "no_header_column"])
        k = rng.randrange(len(rows))
        name = f"csv{index:03d}-{fmt}-{kind}.csv"
        if kind == "valid":
            cases.append(Case(name, _csv(rows, columns), "ok"))
        elif kind == "empty_cell":
            rows[k][columns[-1]] = ""
            cases.append(Case(name, _csv(rows, columns), "error", f"row {k + 1}"))
        elif kind == "numbers":  # a column of numbers only is read as numbers
            for row in rows:
                row[columns[-1]] = rng.randint(0, 9)
            cases.append(Case(name, _csv(rows, columns), "error", "row 1"))
        elif kind == "non_utf8":
            cases.append(Case(name, _csv(rows, columns).replace(b"e", b"\xe9", 1), "error", "is not UTF-8"))
        elif kind == "extra_column":
            cases.append(Case(name, _csv([{**r, "id": i} for i, r in enumerate(rows)], columns + ["id"]), "ok"))
        else:
            cases.append(Case(name, _csv(rows, columns[:-1] + ["other"]), "error" if fmt == "prompt_completion"
                              else "error"))
    cases.append(Case("empty.csv", b"", "error"))
    cases.append(Case("header-only.csv", b"prompt,completion\n", "error"))
    return cases


def _parquet(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _parquet_cases(rng: random.Random) -> list[Case]:
    cases = []
    for index in range(20):
        fmt = rng.choice(["text", "prompt_completion", "chat"])
        rows = _valid_rows(fmt, rng, rng.randint(2, 5))
        kind = rng.choice(["valid", "null", "int_column", "list_column"])
        k = rng.randrange(len(rows))
        name = f"parquet{index:03d}-{fmt}-{kind}.parquet"
        column = next(iter(rows[0]))
        if kind == "valid":
            cases.append(Case(name, _parquet(pa.Table.from_pylist(rows)), "ok"))
        elif kind == "null":
            rows[k][column] = None
            cases.append(Case(name, _parquet(pa.Table.from_pylist(rows)), "error", f"row {k + 1}"))
        else:
            columns = {c: [r[c] for r in rows] for c in rows[0]}
            columns[column] = list(range(len(rows))) if kind == "int_column" else [["a", "b"]] * len(rows)
            cases.append(Case(name, _parquet(pa.table(columns)), "error", "row 1"))
    return cases


def _txt_cases(rng: random.Random) -> list[Case]:
    cases = []
    for index in range(20):
        lines = [r["text"] for r in _valid_rows("text", rng, rng.randint(1, 6))]
        kind = rng.choice(["valid", "blank_lines", "non_utf8", "huge", "crlf"])
        name = f"txt{index:03d}-{kind}.txt"
        if kind == "valid":
            cases.append(Case(name, "\n".join(lines).encode(), "ok"))
        elif kind == "blank_lines":
            cases.append(Case(name, ("\n\n  \n".join(lines) + "\n\n").encode(), "ok"))
        elif kind == "non_utf8":
            k = rng.randrange(len(lines))
            data = [line.encode() for line in lines]
            data[k] = b"\xff" + data[k]
            cases.append(Case(name, b"\n".join(data), "error", f"line {k + 1} is not UTF-8"))
        elif kind == "huge":
            cases.append(Case(name, ("word " * 50_000 + "\n" + "\n".join(lines)).encode(), "ok"))
        else:
            cases.append(Case(name, "\r\n".join(lines).encode(), "ok"))
    cases.append(Case("empty.txt", b"", "error"))
    cases.append(Case("blank.txt", b"\n\n   \n", "error"))
    return cases


CASES = [case for make in (_jsonl_cases, _json_cases, _csv_cases, _parquet_cases, _txt_cases)
         for case in make(random.Random(f"fuzz-{make.__name__}"))]


def test_there_are_enough_cases_of_every_kind():
    assert len(CASES) >= 200
    assert {c.name.rsplit(".", 1)[1] for c in CASES} == {"jsonl", "json", "csv", "parquet", "txt"}
    assert sum(c.expect == "ok" for c in CASES) > 20 and sum(c.expect == "error" for c in CASES) > 100


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return load_tokenizer(ModelArguments(tokenizer_name_or_path=str(workspace.tokenizer)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_file_trains_or_is_refused_in_one_line(case, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("ADAMIX_DS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / case.name
    path.write_bytes(case.content)
    tokenizer.chat_template = CHAT_TEMPLATE if case.chat_template else None
    started = time.perf_counter()
    try:
        examples = tokenize(str(path), DataArguments(max_seq_length=64), tokenizer)
        outcome, message = "ok", ""
    except ConfigError as error:
        outcome, message = "error", str(error)
    finally:
        tokenizer.chat_template = None
    assert time.perf_counter() - started < SECONDS_PER_FILE
    if case.expect != "either":
        assert outcome == case.expect, message
    if outcome == "ok":
        assert len(examples) > 0 and all(t > 0 for t in examples["targets"])
    else:
        assert "\n" not in message and case.name in message, message
        assert case.where in message, message
