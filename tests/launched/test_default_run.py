"""The README's main job: the embedded default run on 2 CPU ranks, end to end, offline."""

import json

from launching import run_entry, run_record


def test_default_run_end_to_end(tmp_path):
    proc = run_entry("train.py", ["--deepspeed", "ds_configs/zero3.json", "--output_dir", str(tmp_path)],
                     ranks=2, timeout=600)
    record = run_record(tmp_path)
    evals = [h["eval/merged/loss"] for h in record["history"] if "eval/merged/loss" in h]
    assert len(evals) == 4  # steps 0, 40, 80, 120
    assert evals[-1] < evals[0] - 0.4, evals  # measured 0.90 -> 0.25
    assert record["arguments"]["data"]["data_path"].endswith("restaurants/train.jsonl")
    assert record["arguments"]["model"]["model_name_or_path"].endswith("resources/restaurants_base")
    # The merged model states the input: slot accuracy over all 200 held-out inputs, at least the 80% aimed at
    # and clearly above the base's (measured 82.2% -> 93.1%, random routing 93.0%).
    slots = record["slot_accuracy"]
    assert list(slots) == ["base", "merged", "random"]
    assert slots["merged"] >= 80 and slots["merged"] >= slots["base"] + 5, slots
    assert f"base {slots['base']:.1f}% -> merged {slots['merged']:.1f}% -> random {slots['random']:.1f}%" in proc.stdout
    assert f"python launch/generate.py --model_path {tmp_path / 'merged' / 'model'} --prompt 'name[" in proc.stdout
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").is_file()
    index = json.loads((tmp_path / "merged" / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(s["prompt"].endswith("=>") and s["generated"] for s in samples)
    for where in ("eval loss (merged):", "checkpoints:", "tensorboard:", "merged adapter:", "merged model:", "samples:",
                  "run record:", "tensorboard --logdir"):
        assert where in proc.stdout
    _check_tensorboard(tmp_path / "tensorboard")
    # Not a terminal: one line per logging step with the ETA, from rank 0 only.
    lines = [line for line in proc.stdout.splitlines() if "train/loss=" in line]
    assert len(lines) == 12 and all("eta=" in line and "[rank0]" in line for line in lines)


def _check_tensorboard(directory):
    """Read the event files back as TensorBoard does: the tags, and finite, decreasing losses."""
    import math

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lm_loss", "train/consistency_loss", "train/lr", "train/grad_norm",
                "perf/tokens_per_s", "perf/step_time_s", "perf/peak_memory_gb", "eval/merged/loss",
                "eval/merged/perplexity", "eval/random/loss", "eval/random/perplexity",
                "experts/divergence/layer_0", "experts/selection_count/layer_0/down/expert_0"}
    assert expected <= scalars, expected - scalars
    assert "hyperparameters/text_summary" in events.Tags()["tensors"]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1  # measured 0.41 -> 0.25
    evals = [e.value for e in events.Scalars("eval/merged/loss")]
    assert evals == sorted(evals, reverse=True)
    counts = sum(e.value for tag in scalars if tag.startswith("experts/selection_count/layer_0/down/")
                 for e in events.Scalars(tag))
    assert counts == 120 * 2 * 2  # q and v of layer 0, one draw per pass (two with consistency) per step


def test_slot_accuracy_on_data_without_attributes_warns_and_the_run_ends_well(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i} =>", "completion": f" number {i}."}) + "\n"
                            for i in range(40)))
    proc = run_entry("train.py", ["--model_name_or_path", "tiny:llama", "--data_path", str(data),
                                  "--eval_split_ratio", "0.2", "--max_steps", "2", "--eval_steps", "0", "--num_samples",
                                  "0", "--merge_at_end", "false", "--slot_accuracy", "true",
                                  "--output_dir", str(tmp_path / "run")])
    assert "--slot_accuracy: no held-out prompt holds attributes like name[...]; not scored" in proc.stdout
    assert "slot_accuracy" not in run_record(tmp_path / "run")
