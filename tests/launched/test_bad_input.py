"""Bad input through the real entry point on 2 ranks: every rank ends with the same one line and exit code 2,
before any model is built, and nothing is written as a checkpoint; a valid file of the same kind trains."""

import json
import re

import pytest
from conftest import write_gguf
from launching import run_entry

CASES = {
    "wrong-type.jsonl": ('{"prompt": "a =>", "completion": " b"}\n{"prompt": "c =>", "completion": 7}\n',
                         r"wrong-type\.jsonl: line 2: column 'completion' must be a non-empty string; found int 7"),
    "latin1.csv": ("text\nThe Mill\nCaf\xe9 Rouge\n".encode("latin-1"),
                   r"latin1\.csv: line 3 is not UTF-8 text"),
    "chat.jsonl": (json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]}) + "\n",
                   r"chat\.jsonl: chat data \(a 'messages' column\) needs a chat template.*--chat_template PATH"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_rank_refuses_bad_input_with_the_same_line(tmp_path, name):
    content, message = CASES[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out"
    proc = run_entry("train.py", ["--data_path", str(path), "--output_dir", str(out), "--max_steps", "1"],
                     ranks=2, check=False, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "adamix_ds: error:" in line]
    assert len(errors) == 2, output[-3000:]  # one line from each rank
    assert len({line.split("adamix_ds: error:", 1)[1] for line in errors}) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in output
    assert not (out / "checkpoints").exists()


def test_a_valid_file_of_the_same_kind_trains(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text('{"prompt": "a =>", "completion": " b"}\n{"prompt": "c =>", "completion": " d"}\n' * 4)
    out = tmp_path / "out"
    run_entry("train.py", ["--data_path", str(path), "--output_dir", str(out), "--max_steps", "1",
                           "--per_device_train_batch_size", "2", "--num_samples", "0", "--merge_at_end", "false"],
              ranks=2, timeout=180)
    assert (out / "checkpoints" / "step-1" / "COMPLETE").is_file()


@pytest.mark.parametrize("architecture, cut, fault", [("llama", 1000, "a damaged or truncated GGUF file"),
                                                     ("rwkv6", 0, "transformers cannot read this GGUF model")])
def test_a_bad_gguf_model_stops_train_and_generate_with_one_line(tmp_path, architecture, cut, fault):
    """A GGUF download cut short, or of an architecture transformers cannot read: train.py and generate.py each end
    with one line and exit code 2, no traceback."""
    path = write_gguf(tmp_path / "model.Q8_0.gguf", architecture)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) - cut])
    for script, args in (("train.py", ["--output_dir", str(tmp_path / "out"), "--max_steps", "1"]),
                         ("generate.py", ["--model_path", str(path), "--prompt", "hello"])):
        proc = run_entry(script, ["--model_name_or_path", str(path), *args], check=False, timeout=120)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if "adamix_ds: error:" in line]
        assert proc.returncode == 2 and len(errors) == 1, output[-3000:]
        assert f"{path}: {fault}" in errors[0] and "Traceback" not in output, errors
