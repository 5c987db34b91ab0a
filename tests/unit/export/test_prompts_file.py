"""launch/generate.py --prompts_file: the prompts of a jsonl file, and a clear error for any other file."""

import json
import re

import pytest

from adamix_ds.config import ConfigError
from adamix_ds.export.generation import read_prompts


def test_the_prompt_of_each_line_in_order(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "name[Aromi] =>", "completion": " x"}) + "\n\n"
                    + json.dumps({"prompt": "name[Cotto] =>"}) + "\n", encoding="utf-8")
    assert read_prompts(str(path)) == ["name[Aromi] =>", "name[Cotto] =>"]


@pytest.mark.parametrize("text, fault", [
    ("name[Aromi] =>\n", "line 1 is not valid JSON"), ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: no column 'prompt'"),
    ('{"prompt": 3}\n', "line 1: column 'prompt' must be a non-empty string; found int 3"),
    ('["a"]\n', "line 1 is not a JSON object; found list")])
def test_a_line_without_a_prompt_is_named(tmp_path, text, fault):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"--prompts_file {path}: {fault}")):
        read_prompts(str(path))
    with pytest.raises(ConfigError, match="file not found"):
        read_prompts(str(tmp_path / "missing.jsonl"))
