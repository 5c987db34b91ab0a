"""Data: formats and loss masks, bad input, truncation and packing, the per-node tokenization cache,
and the step sampler."""

import json

import datasets
import pytest

from adamix_ds import distributed
from adamix_ds.arguments import DataArguments, ModelArguments
from adamix_ds.config import ConfigError
from adamix_ds.data.batching import StepSampler, collate
from adamix_ds.data.tokenization import tokenize
from adamix_ds.data.tokenizer import load_tokenizer
from adamix_ds.distributed.ds_config import BatchPlan

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMIX_DS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return load_tokenizer(ModelArguments(tokenizer_name_or_path=str(workspace.tokenizer)))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_loss_on_completion_only(tmp_path, cache, tokenizer):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "name[Aromi] =>", "completion": " Aromi serves food."}])
    row = tokenize(path, DataArguments(max_seq_length=64), tokenizer)[0]
    prompt = tokenizer("name[Aromi] =>")["input_ids"]
    completion = tokenizer(" Aromi serves food.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + completion
    assert row["labels"] == [-100] * len(prompt) + completion
    assert row["targets"] == len(completion)


def test_text_format_counts_every_token(tmp_path, cache, tokenizer):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "The Mill is a pub."}])
    row = tokenize(path, DataArguments(max_seq_length=64), tokenizer)[0]
    assert row["labels"] == row["input_ids"] == tokenizer("The Mill is a pub.")["input_ids"] + [tokenizer.eos_token_id]


def test_chat_loss_on_assistant_turns_only(tmp_path, cache, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "name[Zizzi] =>"}, {"role": "assistant", "content": "Zizzi is a pub."},
                {"role": "user", "content": "area?"}, {"role": "assistant", "content": "riverside"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    try:
        row = tokenize(path, DataArguments(max_seq_length=128), tokenizer)[0]
    finally:
        tokenizer.chat_template = None
    learned = tokenizer.decode([t for t in row["labels"] if t != -100])
    assert learned.replace(" ", "") == "Zizziisapub.</s>riverside</s>".replace(" ", "")
    assert "name[Zizzi]" in tokenizer.decode(row["input_ids"])


@pytest.mark.parametrize(
    "name, content, fmt, message",
    [
        ("missing.jsonl", None, "auto", "file not found"),
        ("data.xml", "<x/>", "auto", "not found, or an unknown file type"),
        ("cols.jsonl", '{"question": "a", "answer": "b"}\n', "auto", r"columns found \['answer', 'question'\]"),
        ("cols2.jsonl", '{"prompt": "a"}\n', "prompt_completion", r"needs columns \['completion', 'prompt'\]; found \['prompt'\]"),
        ("broken.jsonl", '{"text": "ok"}\n{"text": "no end"\n', "auto", "line 2 is not valid JSON"),
        ("fmt.jsonl", '{"text": "ok"}\n', "markdown", "--data_format='markdown'"),
        ("chat.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", "line 1: a chat without an assistant turn"),
        ("empty.jsonl", '{"prompt": "a long prompt that fills everything", "completion": " x"}\n', "auto",
         "no example has a target token left"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, cache, tokenizer, name, content, fmt, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        with pytest.raises(ConfigError, match=message):
            tokenize(str(path), DataArguments(data_format=fmt, max_seq_length=4, drop_long=False), tokenizer)
    finally:
        tokenizer.chat_template = None


def test_truncation_is_counted_and_drop_long_drops(tmp_path, cache, tokenizer, caplog):
    rows = [{"text": "short"}, {"text": "a much longer text that certainly exceeds eight tokens of budget"}]
    path = _jsonl(tmp_path / "len.jsonl", rows)
    with caplog.at_level("INFO"):
        truncated = tokenize(path, DataArguments(max_seq_length=8), tokenizer)
    assert [len(r) for r in truncated["input_ids"]] == [len(tokenizer("short")["input_ids"]) + 1, 8]
    assert "1 of 2 examples are longer than --max_seq_length 8 and were truncated" in caplog.text
    dropped = tokenize(path, DataArguments(max_seq_length=8, drop_long=True), tokenizer)
    assert len(dropped) == 1


def test_packing_fills_blocks(tmp_path, cache, tokenizer):
    rows = [{"text": f"The Mill number {i} is a pub near Zizzi."} for i in range(20)]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    packed = tokenize(path, DataArguments(max_seq_length=16, packing=True), tokenizer)
    total = sum(len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows)
    assert all(len(r) == 16 for r in packed["input_ids"])
    assert len(packed) == total // 16
    assert packed[0]["labels"] == packed[0]["input_ids"]


def test_save_to_disk_directory(tmp_path, cache, tokenizer):
    datasets.Dataset.from_list([{"text": "The Eagle is a pub."}]).save_to_disk(str(tmp_path / "saved"))
    assert len(tokenize(str(tmp_path / "saved"), DataArguments(max_seq_length=32), tokenizer)) == 1


def test_other_ranks_reuse_the_first_ranks_tokens(tmp_path, cache, tokenizer, monkeypatch):
    path = _jsonl(tmp_path / "r.jsonl", [{"text": "The Phoenix is a restaurant."}])
    args = DataArguments(max_seq_length=32)
    monkeypatch.setattr(distributed, "local_rank", lambda: 1)
    with pytest.raises(ConfigError, match="tokenization on this node's first rank did not finish"):
        tokenize(path, args, tokenizer)
    monkeypatch.setattr(distributed, "local_rank", lambda: 0)
    first = tokenize(path, args, tokenizer)
    monkeypatch.setattr(distributed, "local_rank", lambda: 1)
    monkeypatch.setattr("adamix_ds.data.tokenization.read_examples", lambda *a: pytest.fail("rank 1 read the data"))
    assert tokenize(path, args, tokenizer)["input_ids"] == first["input_ids"]
    assert len(list(cache.glob("tokenized/*"))) == 1


def test_sampler_splits_each_global_batch_and_resumes_exactly():
    plan = BatchPlan(micro_batch=2, accumulation=3, world_size=2)
    sampler = StepSampler(num_examples=50, plan=plan, seed=7)
    assert sampler.steps_per_epoch == 4
    seen = []
    for step in range(8):
        rows = [sampler.rows(step, m, r) for m in range(3) for r in range(2)]
        flat = [i for part in rows for i in part]
        assert len(flat) == len(set(flat)) == 12
        seen.append(flat)
    epoch0 = [i for s in seen[:4] for i in s]
    assert len(set(epoch0)) == 48
    assert seen[:4] != seen[4:]
    fresh = StepSampler(num_examples=50, plan=plan, seed=7)
    assert [fresh.rows(5, m, r) for m in range(3) for r in range(2)] == [sampler.rows(5, m, r) for m in range(3)
                                                                          for r in range(2)]
    assert StepSampler(50, plan, seed=8).rows(0, 0, 0) != sampler.rows(0, 0, 0)
    with pytest.raises(ConfigError, match="fewer than one global batch of 12"):
        StepSampler(num_examples=11, plan=plan, seed=7)


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_chat_messages_keep_every_key_the_template_uses(tmp_path, cache, tokenizer):
    """Keys beside role and content (a name, tool calls) reach the chat template, whatever their shape."""
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}{% if m.name %}:{{ m.name }}{% endif %}|>"
                               "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": "hi", "name": "Zizzi"},
                          {"role": "assistant", "content": "hello", "tool_calls": [{"id": 1}]}]},
            {"messages": [{"role": "user", "content": "area?"}, {"role": "assistant", "content": "riverside"}]}]
    path = _jsonl(tmp_path / "named.jsonl", rows)
    try:
        first = tokenize(path, DataArguments(max_seq_length=128), tokenizer)[0]
    finally:
        tokenizer.chat_template = None
    assert "userZizzi" in tokenizer.decode(first["input_ids"]).replace(" ", "")  # the name, right after the role
