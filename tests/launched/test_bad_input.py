"""Bad input through the real entry point: one line on stderr and exit code 2, before any model is built."""

import json

from launching import run_entry


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_input_exits_with_code_2(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "a"}])
    proc = run_entry("train.py", ["--data_path", path, "--output_dir", str(tmp_path / "out")], check=False)
    assert proc.returncode == 2
    assert "adamix_ds: error:" in proc.stderr and "columns found ['question']" in proc.stderr
