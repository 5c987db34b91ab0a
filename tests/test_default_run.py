"""The README's main job: the embedded default run on 2 CPU ranks, end to end, offline."""

import json

from launching import run_entry, run_record


def test_default_run_end_to_end(tmp_path):
    proc = run_entry("train.py", ["--deepspeed", "ds_configs/zero3.json", "--output_dir", str(tmp_path)],
                     ranks=2, timeout=600)
    record = run_record(tmp_path)
    evals = [h["eval/merged/loss"] for h in record["history"] if "eval/merged/loss" in h]
    assert len(evals) == 4  # steps 0, 50, 100, 150
    assert evals[-1] < evals[0] - 0.5, evals
    assert record["arguments"]["data"]["data_path"].endswith("restaurants/train.jsonl")
    assert record["arguments"]["model"]["model_name_or_path"] == "small:llama"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").is_file()
    index = json.loads((tmp_path / "merged" / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].endswith("=>") and s["generated"] for s in samples)
    for where in ("checkpoints:", "tensorboard:", "merged adapter:", "merged model:", "samples:", "run record:"):
        assert where in proc.stdout
