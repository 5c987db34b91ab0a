"""The trainer on other families and methods: tiny Qwen2, Mistral and GPT-2 bases, LoRA and adapters."""

import pytest
from safetensors.torch import load_file

from launching import run_entry, run_record, train_losses
from workspace import build_workspace


@pytest.mark.parametrize(
    "family, method, ranks, ds_config",
    [("qwen2", "adamix-lora", 1, "zero3"), ("mistral", "adamix-adapter", 1, "zero2"),
     ("gpt2", "adamix-lora", 2, "zero3"), ("gpt2", "adamix-adapter", 1, "zero3_offload")],
)
def test_trains_and_merges(family, method, ranks, ds_config, tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp(family), family=family, examples=60)
    out = tmp_path_factory.mktemp("out")
    run_entry("train.py", [
        "--deepspeed", f"ds_configs/{ds_config}.json", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data), "--output_dir", str(out),
        "--method", method, "--num_experts", "2", "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--max_seq_length", "40", "--consistency_weight", "1",
        "--eval_split_ratio", "0.2", "--learning_rate", "1e-2",
    ], ranks=ranks)
    record = run_record(out)
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert record["final_eval"]["eval/merged/loss"] > 0
    assert record["base_partition"]["world_size"] == ranks
    assert record["base_partition"]["zero_stage"] == (2 if ds_config == "zero2" else 3)
    adapter = out / "merged" / "adapter"
    if method == "adamix-lora":
        assert (adapter / "adapter_model.safetensors").is_file()
        assert (out / "merged" / "model" / "model.safetensors.index.json").is_file()
    else:
        weights = load_file(str(adapter / "mixtures.safetensors"))
        assert all(t.shape[0] == 1 for t in weights.values())
