"""The trainer on other families, methods and DeepSpeed configs: tiny Qwen2 (bf16), Mistral and GPT-2 bases."""

import json
import math

import pytest
import torch
from launching import REPO, run_entry, run_record, train_losses
from safetensors.torch import load_file
from workspace import build_workspace


@pytest.mark.parametrize(
    "family, method, ranks, ds_config",
    [("qwen2", "adamix-lora", 2, "zero3_bf16"), ("mistral", "adamix-adapter", 1, "zero2"),
     ("gpt2", "adamix-lora", 2, "zero3"), ("gpt2", "adamix-adapter", 1, "zero3_offload")],
)
def test_trains_and_merges(family, method, ranks, ds_config, tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp(family), family=family, examples=60)
    out = tmp_path_factory.mktemp("out")
    config_path = REPO / "ds_configs" / f"{ds_config}.json"
    if ds_config == "zero3_bf16":  # bf16 set explicitly also runs on the CPU: the bf16 path without a GPU
        config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        config["bf16"] = {"enabled": True}
        config_path = out / "zero3_bf16.json"
        config_path.write_text(json.dumps(config))
    run_entry("train.py", [
        "--deepspeed", str(config_path), "--model_name_or_path", str(ws.base), "--data_path", str(ws.data), "--output_dir", str(out),
        "--method", method, "--num_experts", "2", "--max_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--max_seq_length", "40", "--consistency_weight", "1",
        "--eval_split_ratio", "0.2", "--learning_rate", "1e-2",
    ], ranks=ranks)
    record = run_record(out)
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert record["final_eval"]["eval/merged/loss"] > 0
    assert record["base_partition"]["world_size"] == ranks
    assert record["base_partition"]["zero_stage"] == (2 if ds_config == "zero2" else 3)
    assert all(math.isfinite(loss) for loss in train_losses(out).values())
    adapter = out / "merged" / "adapter"
    if method == "adamix-lora":
        assert (adapter / "adapter_model.safetensors").is_file()
        shards = list((out / "merged" / "model").glob("model-*.safetensors"))
        assert len(shards) == ranks
        dtype = torch.bfloat16 if ds_config == "zero3_bf16" else torch.float32
        assert {t.dtype for shard in shards for t in load_file(str(shard)).values()} == {dtype}
    else:
        weights = load_file(str(adapter / "mixtures.safetensors"))
        assert all(t.shape[0] == 1 for t in weights.values())
    _merged_logits_equal_base_plus_mixtures(ws, out, method, ds_config)


def _merged_logits_equal_base_plus_mixtures(ws, out, method, ds_config):
    """What the run exports against the base it started from plus its final checkpoint's mixtures, served merged:
    the folded model (LoRA) or the base with the merged adapter (adapters)."""
    from transformers import AutoModelForCausalLM

    from adamix_ds import load_mixtures

    dtype = torch.bfloat16 if ds_config == "zero3_bf16" else torch.float32

    def base():  # as the run held it (bf16 under the bf16 config), compared in fp32
        return AutoModelForCausalLM.from_pretrained(ws.base, dtype=dtype).float().eval()

    ids = torch.randint(4, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_model = base()
        load_mixtures(reference_model, out / "checkpoints" / "step-3")
        reference = reference_model(input_ids=ids).logits
        if method == "adamix-lora":
            served = AutoModelForCausalLM.from_pretrained(out / "merged" / "model").float().eval()
        else:
            served = base()
            load_mixtures(served, out / "merged" / "adapter")
        logits = served(input_ids=ids).logits
        untrained = base()(input_ids=ids).logits
    assert (reference - untrained).abs().max() > 1e-3  # the mixtures changed the model: the comparison can fail
    if dtype == torch.bfloat16:  # the folded weights were rounded to bf16 once
        assert float((logits - reference).norm() / reference.norm()) < 1e-2
    else:
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
