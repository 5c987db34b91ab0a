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


def test_messages_rows_are_chats_that_end_on_a_user_turn(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"prompt": "name[Cotto] =>"}) + "\n")
    assert read_prompts(str(path)) == [chat, "name[Cotto] =>"]
    path.write_text(json.dumps({"messages": chat + [{"role": "assistant", "content": "Hello"}]}) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"--prompts_file {path}: line 1: 'messages' must end on a user "
                                                    "turn")):
        read_prompts(str(path))
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ConfigError, match="'messages' must be a non-empty list of {'role', 'content'} turns"):
        read_prompts(str(path))


def test_chat_prompts_render_the_models_own_template(smollm2):
    """--chat makes a text one user turn; a messages row keeps its turns; both end with the assistant's header, as
    SmolLM2's ChatML template writes them out (by hand here)."""
    from adamix_ds.export.generation import prompt_ids

    _, tokenizer = smollm2
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tokenizer.decode(prompt_ids(tokenizer, "Hi", chat=True)) == (
        system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.decode(prompt_ids(tokenizer, chat, chat=False)) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_ids(tokenizer, "Hi", chat=False) == tokenizer("Hi")["input_ids"]
