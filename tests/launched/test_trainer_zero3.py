"""The trainer on ZeRO-3 through the real launcher: 2 ranks against 1, accumulation, routes, replicas,
resume, and the shard-aware merged checkpoint. Few launches, many checks per launch."""

import json
import math
import shutil

import pytest
import torch
from launching import run_entry, run_record, train_losses
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adamix_ds import load_mixtures
from adamix_ds.training.checkpoints import COMPLETE_MARKER

STEPS = 5


def _args(ws, out, micro, accumulation=1, extra=()):
    return [
        "--deepspeed", "ds_configs/zero3.json", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data),
        "--output_dir", str(out), "--max_seq_length", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
        "--learning_rate", "5e-3", "--warmup_steps", "1", "--method", "adamix-lora", "--num_experts", "4",
        "--share", "none", "--lora_r", "4", "--consistency_weight", "1.0", "--eval_split_ratio", "0.1",
        "--eval_steps", "2",
        "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accumulation), *extra,
    ]


def _final_weights(out):
    return load_file(str(out / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    out = {name: root / name for name in ("two_ranks", "one_rank", "accumulated", "resumed")}
    run_entry("train.py", _args(workspace, out["two_ranks"], 2, extra=(
        "--save_steps", "2", "--save_total_limit", "10", "--save_routes", "--check_routes_every", "1")), ranks=2)
    run_entry("train.py", _args(workspace, out["one_rank"], 4, extra=("--merge_at_end", "false")))
    run_entry("train.py", _args(workspace, out["accumulated"], 2, accumulation=2, extra=("--merge_at_end", "false")))
    # A crash right after the step-2 checkpoint: a new job finds it and continues, recomputing activations
    # in the backward (which must change nothing, routes and consistency passes included).
    shutil.copytree(out["two_ranks"] / "checkpoints" / "step-2", out["resumed"] / "checkpoints" / "step-2")
    run_entry("train.py", _args(workspace, out["resumed"], 2, extra=(
        "--resume_from_checkpoint", "auto", "--merge_at_end", "false", "--gradient_checkpointing", "true")), ranks=2)
    return out


def _assert_close_weights(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def test_two_ranks_equal_one_rank_with_twice_the_micro_batch(runs):
    two, one = train_losses(runs["two_ranks"]), train_losses(runs["one_rank"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    _assert_close_weights(_final_weights(runs["two_ranks"]), _final_weights(runs["one_rank"]), 1e-5)
    assert all(w.abs().sum() > 0 for name, w in _final_weights(runs["two_ranks"]).items() if name.endswith("lora_B"))


def test_accumulation_equals_one_larger_micro_batch(runs):
    acc, one = train_losses(runs["accumulated"]), train_losses(runs["one_rank"])
    for step in one:
        assert acc[step] == pytest.approx(one[step], abs=1e-5), step
    _assert_close_weights(_final_weights(runs["accumulated"]), _final_weights(runs["one_rank"]), 1e-5)


def _evals(out):
    return {h["step"]: {k: v for k, v in h.items() if k.startswith("eval/")}
            for h in run_record(out)["history"] if "eval/merged/loss" in h}


def test_evaluation_does_not_depend_on_ranks_batching_or_resume(runs):
    """Random routing draws each eval example's experts from its index in the eval set, so the eval batch
    (2 per rank on 2 ranks, 4 on one), the forwards before (accumulation) and a resume change nothing."""
    reference = _evals(runs["two_ranks"])
    assert sorted(reference) == [0, 2, 4, 5]
    assert reference[5]["eval/random/loss"] != reference[5]["eval/merged/loss"]
    for name in ("one_rank", "accumulated", "resumed"):
        evals = _evals(runs[name])
        assert set(evals) <= set(reference) and len(evals) >= 2, name
        for step, metrics in evals.items():
            assert metrics.keys() == reference[step].keys()
            for key, value in metrics.items():
                assert value == pytest.approx(reference[step][key], rel=1e-5), (name, step, key)


def test_routes_identical_on_both_ranks(runs):
    rank0 = (runs["two_ranks"] / "routes" / "rank-0.jsonl").read_text().splitlines()
    rank1 = (runs["two_ranks"] / "routes" / "rank-1.jsonl").read_text().splitlines()
    assert rank0 == rank1
    # steps x passes x slots x sides, with real variety in the chosen experts
    assert len(rank0) == STEPS * 2 * 4 * 2
    assert len({line.rsplit(",", 1)[1] for line in rank0}) == 4


def test_base_is_sharded_and_mixtures_replicated(runs, workspace):
    record = run_record(runs["two_ranks"])
    partition = record["base_partition"]
    assert partition == {**partition, "world_size": 2, "zero_stage": 3}
    full = AutoModelForCausalLM.from_pretrained(workspace.base)
    for name, p in full.named_parameters():
        assert partition["rank0_numel"][name] == math.ceil(p.numel() / 2), name
    weights = _final_weights(runs["two_ranks"])
    assert weights["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 4, 32)
    assert weights["model.layers.1.self_attn.v_proj.lora_B"].shape == (4, 16, 4)
    assert record["batch"]["global_batch"] == 4


def test_resume_continues_exactly_with_or_without_activation_checkpointing(runs):
    assert run_record(runs["resumed"])["arguments"]["train"]["gradient_checkpointing"] is True
    resumed, uninterrupted = train_losses(runs["resumed"]), train_losses(runs["two_ranks"])
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert resumed[step] == uninterrupted[step], step
    _assert_close_weights(_final_weights(runs["resumed"]), _final_weights(runs["two_ranks"]), 0)


def test_checkpoints_are_complete_and_pruned(runs):
    names = sorted(p.name for p in (runs["two_ranks"] / "checkpoints").iterdir())
    assert names == ["step-2", "step-4", "step-5"]
    assert all((runs["two_ranks"] / "checkpoints" / n / COMPLETE_MARKER).is_file() for n in names)


def test_merged_model_loads_plainly_with_merged_logits(runs, workspace):
    merged = AutoModelForCausalLM.from_pretrained(runs["two_ranks"] / "merged" / "model")
    index = (runs["two_ranks"] / "merged" / "model" / "model.safetensors.index.json").read_text()
    assert "model-00001-of-00002.safetensors" in index and "model-00002-of-00002.safetensors" in index
    base = AutoModelForCausalLM.from_pretrained(workspace.base)
    mixtures = load_mixtures(base, runs["two_ranks"] / "checkpoints" / f"step-{STEPS}")
    base.eval()
    merged.eval()
    ids = torch.randint(4, 190, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=1e-4, atol=1e-4)
    assert mixtures.config.num_experts == 4
    peft = pytest.importorskip("peft")
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace.base),
                                             runs["two_ranks"] / "merged" / "adapter")
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_job_on_a_checkpoint_writes_the_same_model(runs, workspace, tmp_path):
    run_entry("merge.py", ["--checkpoint", str(runs["two_ranks"] / "checkpoints" / f"step-{STEPS}"),
                           "--model_name_or_path", str(workspace.base), "--output_dir", str(tmp_path)], ranks=2)
    ours = {}
    theirs = {}
    for shard in (tmp_path / "merged" / "model").glob("*.safetensors"):
        ours.update(load_file(str(shard)))
    for shard in (runs["two_ranks"] / "merged" / "model").glob("*.safetensors"):
        theirs.update(load_file(str(shard)))
    _assert_close_weights(ours, theirs, 0)
    assert (tmp_path / "merged" / "model" / "tokenizer_config.json").is_file()
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").is_file()


def test_generate_from_merged_model_and_from_checkpoint(runs, workspace, tmp_path):
    from adamix_ds.arguments import ModelArguments
    from adamix_ds.export.generation import GenerateArguments, complete, decoding_config, load_for_generation

    prompt = "name[Zizzi] food[Italian] area[riverside] rating[high] =>"
    out_file = tmp_path / "gen.jsonl"
    run_entry("generate.py", ["--model_path", str(runs["two_ranks"] / "merged" / "model"), "--prompt", prompt,
                              "--max_new_tokens", "12", "--output_file", str(out_file)])
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    args = GenerateArguments(model_path=str(runs["two_ranks"] / "merged" / "model"), max_new_tokens=12)
    model, tokenizer, _ = load_for_generation(ModelArguments(), args)
    expected = complete(model, tokenizer, [tokenizer(prompt)["input_ids"]], decoding_config(args, tokenizer))
    assert written == [{"prompt": prompt, "completion": expected[0]}]
    checkpoint = GenerateArguments(model_path=str(runs["two_ranks"] / "checkpoints" / f"step-{STEPS}"),
                                   eval_mode="random", max_new_tokens=12)
    model, tokenizer, _ = load_for_generation(ModelArguments(model_name_or_path=str(workspace.base)), checkpoint)
    assert len(complete(model, tokenizer, [tokenizer(prompt)["input_ids"]], decoding_config(checkpoint, tokenizer))) == 1
    proc = run_entry("generate.py", ["--model_path", str(runs["two_ranks"] / "checkpoints" / f"step-{STEPS}"),
                                     "--prompt", prompt], check=False)
    assert proc.returncode == 2 and "needs --model_name_or_path" in proc.stderr
