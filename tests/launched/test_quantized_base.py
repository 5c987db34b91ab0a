"""A 4-bit base (--quantization_bit 4) through the real launcher: ZeRO-3 partitions it on 2 ranks, AdaMix lowers
the loss, resumes exactly and exports a dequantized merged model that PEFT's adapter on the unquantized base
reproduces up to the quantization error. A routed method trains over a built-in 8-bit base, partitioned too."""

import math
import shutil

import pytest
import torch
from launching import run_entry, run_record, train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

bnb = pytest.importorskip("bitsandbytes")
STEPS = 6


def _args(ws, out, method="adamix-lora", bits="4", extra=()):
    return [
        "--deepspeed", "ds_configs/zero3.json", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data),
        "--output_dir", str(out), "--max_seq_length", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
        "--learning_rate", "1e-2", "--warmup_steps", "1", "--method", method, "--quantization_bit", bits,
        "--eval_split_ratio", "0.1", "--eval_steps", "3", "--per_device_train_batch_size", "4", *extra,
    ]


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {name: root / name for name in ("adamix", "resumed", "routed")}
    run_entry("train.py", _args(workspace, out["adamix"], extra=(
        "--num_experts", "4", "--consistency_weight", "1", "--save_steps", "2", "--save_total_limit", "10",
        "--check_routes_every", "1")), ranks=2)
    shutil.copytree(out["adamix"] / "checkpoints" / "step-2", out["resumed"] / "checkpoints" / "step-2")
    run_entry("train.py", _args(workspace, out["resumed"], extra=(
        "--num_experts", "4", "--consistency_weight", "1", "--resume_from_checkpoint", "auto",
        "--merge_at_end", "false")), ranks=2)
    routed = _args(workspace, out["routed"], method="moa-sparse", bits="8")
    routed[routed.index(str(workspace.base))] = "tiny:llama"  # drawn whole, then quantized as it loads
    run_entry("train.py", [*routed, "--tokenizer_name_or_path", str(workspace.tokenizer)], ranks=2)
    return out


def _eval_losses(out, mode="merged"):
    return [h[f"eval/{mode}/loss"] for h in run_record(out)["history"] if f"eval/{mode}/loss" in h]


def test_adamix_on_a_4bit_base_partitioned_by_zero3_lowers_the_loss(runs, workspace):
    record = run_record(runs["adamix"])
    assert record["arguments"]["model"]["quantization_bit"] == 4
    losses = _eval_losses(runs["adamix"])
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses
    partition = record["base_partition"]
    assert partition["world_size"] == 2 and partition["zero_stage"] == 3
    stored = 32 * 32 // 2  # q_proj: 1024 4-bit codes, 2 per byte, packed into 4-byte (fp32) storage elements
    assert partition["rank0_numel"]["model.layers.0.self_attn.q_proj.weight"] == math.ceil(stored / 4 / 2)
    full = AutoModelForCausalLM.from_pretrained(workspace.base)
    assert record["parameters"]["base"] == sum(p.numel() for p in full.parameters())


def test_resume_on_a_4bit_base_continues_exactly(runs):
    resumed, uninterrupted = train_losses(runs["resumed"]), train_losses(runs["adamix"])
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for step in resumed:
        assert resumed[step] == uninterrupted[step], step


def test_routed_method_trains_on_a_built_in_8bit_base_partitioned_by_zero3(runs):
    record = run_record(runs["routed"])
    assert record["arguments"]["model"]["quantization_bit"] == 8
    partition = record["base_partition"]
    assert partition["zero_stage"] == 3
    assert partition["rank0_numel"]["model.layers.0.self_attn.q_proj.weight"] == 32 * 32 // 2  # int8, halved
    losses = _eval_losses(runs["routed"], mode="routed")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.05, losses


def test_merged_model_is_the_dequantized_base_plus_the_adapter_peft_loads(runs, workspace):
    """merged/model = dequantize(4-bit base) + averaged delta; PEFT applies the same delta to the unquantized
    base, so the two differ by the quantization error alone (docs/memory.md's statement)."""
    from transformers import BitsAndBytesConfig

    peft = pytest.importorskip("peft")
    model_dir = runs["adamix"] / "merged" / "model"
    merged = {}
    for shard in model_dir.glob("*.safetensors"):
        merged.update(load_file(str(shard)))
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert getattr(plain.config, "quantization_config", None) is None
    original = dict(AutoModelForCausalLM.from_pretrained(workspace.base).named_parameters())
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace.base),
                                             runs["adamix"] / "merged" / "adapter").merge_and_unload()
    with_delta = dict(adapted.named_parameters())
    quantized = AutoModelForCausalLM.from_pretrained(
        workspace.base, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                               bnb_4bit_quant_storage=torch.float32))
    layers = {f"{n}.weight": m for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14 and set(layers) <= set(merged)
    moved = 0
    for name, value in merged.items():
        if name in layers:
            w = layers[name].weight
            dequantized = bnb.functional.dequantize_4bit(w.data, w.quant_state).reshape(value.shape)
            delta = with_delta[name].detach() - original[name].detach()
            moved += int(delta.abs().max() > 1e-4)
            torch.testing.assert_close(value, dequantized + delta, rtol=1e-5, atol=1e-6, msg=name)
            assert (value - with_delta[name]).abs().max() > 0, name  # the quantization error is there
        else:
            torch.testing.assert_close(value, original[name].detach(), rtol=0, atol=0, msg=name)
    assert moved == 4  # the LoRA targets: q and v of both layers


def test_routed_export_writes_the_8bit_base_dequantized(runs, workspace):
    """The routed export writes the base beside the mixture: here the 8-bit weights read back, each within half a
    quantization step (of the row's fp16 values) of the weights the run drew (tiny:llama, seed 42)."""
    from adamix_ds.builtin_models import builtin_config

    model_dir = runs["routed"] / "merged" / "model"
    assert (model_dir / "mixtures.safetensors").is_file()
    written = {}
    for shard in model_dir.glob("*.safetensors"):
        if shard.name != "mixtures.safetensors":
            written.update(load_file(str(shard)))
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    torch.manual_seed(42)
    drawn = dict(AutoModelForCausalLM.from_config(builtin_config("tiny:llama", vocab)).named_parameters())
    assert written.keys() == drawn.keys()
    for name, value in written.items():
        w = drawn[name].detach()
        if name.endswith("proj.weight"):
            step = w.half().float().abs().amax(dim=1, keepdim=True) / 127
            assert bool(((value - w).abs() <= step / 2 + (w - w.half().float()).abs() + 1e-6).all()), name
            assert not torch.equal(value, w), name
        else:
            assert torch.equal(value, w), name


def test_merge_job_with_the_same_quantization_writes_the_same_model(runs, workspace, tmp_path):
    run_entry("merge.py", ["--checkpoint", str(runs["adamix"] / "checkpoints" / f"step-{STEPS}"),
                           "--model_name_or_path", str(workspace.base), "--quantization_bit", "4",
                           "--output_dir", str(tmp_path)])
    ours, theirs = {}, {}
    for shard in (tmp_path / "merged" / "model").glob("*.safetensors"):
        ours.update(load_file(str(shard)))
    for shard in (runs["adamix"] / "merged" / "model").glob("*.safetensors"):
        theirs.update(load_file(str(shard)))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
