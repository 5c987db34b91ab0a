"""The routed methods through the real entry points: each lowers the loss on the default task; moa-sparse
under ZeRO-3 on 2 ranks (different data per rank, data-dependent expert activity) equals 1 rank with
the same global batch, resumes exactly, and its export serves generation."""

import json
import shutil

import pytest
import torch
from launching import run_entry, run_record, train_losses
from safetensors.torch import load_file

from adamix_ds.arguments import ModelArguments
from adamix_ds.export.generation import GenerateArguments, load_for_generation

ROUTED_METHODS = ["moa-soft", "moa-sparse", "molora", "hydralora", "topk-lora"]


@pytest.mark.parametrize("method", ROUTED_METHODS)
def test_each_routed_method_lowers_the_loss_on_the_default_task(method, tmp_path):
    run_entry("train.py", ["--deepspeed", "ds_configs/zero3.json", "--model_name_or_path", "tiny:llama",
                           "--output_dir", str(tmp_path), "--method", method, "--max_steps", "40",
                           "--eval_steps", "40", "--save_steps", "0", "--num_samples", "0", "--merge_at_end", "false",
                           "--learning_rate", "1e-2", "--logging_steps", "20"])
    record = run_record(tmp_path)
    evals = [h["eval/routed/loss"] for h in record["history"] if "eval/routed/loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0] - 0.1, evals
    logged = next(h for h in record["history"] if "train/loss" in h)
    assert logged["routers/gate_std"] > 0
    assert ("routers/active_experts" in logged) == (method in ("moa-sparse", "topk-lora"))
    assert ("train/aux_loss" in logged) == (method == "topk-lora")
    if method == "topk-lora":
        assert logged["routers/active_experts"] == pytest.approx(2.0)
    names = record["arguments"]["mixture"]["moa_experts"]
    if method.startswith("moa-"):
        assert all(f"routers/layer_0/mean_gate/{e}" in logged for e in names.split(","))
    assert record["parameters"]["served"] == record["parameters"]["trained"]


STEPS = 6


def _args(ws, out, micro, extra=()):
    return ["--deepspeed", "ds_configs/zero3.json", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data),
            "--output_dir", str(out), "--max_seq_length", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-2", "--warmup_steps", "1", "--method", "moa-sparse", "--max_threshold", "1.0",
            "--per_device_train_batch_size", str(micro), *extra]


@pytest.fixture(scope="module")
def sparse_runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("moa_zero3")
    out = {name: root / name for name in ("two_ranks", "one_rank", "resumed")}
    run_entry("train.py", _args(workspace, out["two_ranks"], 2, ("--save_steps", "3", "--save_total_limit", "5")),
              ranks=2)
    run_entry("train.py", _args(workspace, out["one_rank"], 4, ("--merge_at_end", "false")))
    shutil.copytree(out["two_ranks"] / "checkpoints" / "step-3", out["resumed"] / "checkpoints" / "step-3")
    run_entry("train.py", _args(workspace, out["resumed"], 2, ("--resume_from_checkpoint", "auto",
                                                               "--merge_at_end", "false",
                                                               "--gradient_checkpointing", "true")), ranks=2)
    return out


def _final(out):
    return load_file(str(out / "checkpoints" / f"step-{STEPS}" / "mixtures.safetensors"))


def test_two_ranks_with_different_data_equal_one_rank(sparse_runs):
    two, one = train_losses(sparse_runs["two_ranks"]), train_losses(sparse_runs["one_rank"])
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert two[STEPS] < two[1]
    a, b = _final(sparse_runs["two_ranks"]), _final(sparse_runs["one_rank"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    history = run_record(sparse_runs["two_ranks"])["history"]
    active = [h["routers/active_experts"] for h in history if "routers/active_experts" in h]
    assert len(active) == STEPS and all(1 < a < 5 for a in active), active  # data-dependent activity


def test_resume_continues_exactly_with_or_without_activation_checkpointing(sparse_runs):
    """The resumed run recomputes activations in the backward: weights, losses and router statistics
    (token counts of padded batches, gates) are those of the run that kept them."""
    full, resumed = _final(sparse_runs["two_ranks"]), _final(sparse_runs["resumed"])
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)
    record = run_record(sparse_runs["resumed"])
    assert record["arguments"]["train"]["gradient_checkpointing"] is True
    logged = {h["step"]: h for h in run_record(sparse_runs["two_ranks"])["history"] if "train/loss" in h}
    resumed_steps = [h for h in record["history"] if "train/loss" in h]
    assert [h["step"] for h in resumed_steps] == [4, 5, 6]
    for h in resumed_steps:
        routers = {k: v for k, v in h.items() if k.startswith(("routers/", "train/loss"))}
        assert routers and routers == {k: logged[h["step"]][k] for k in routers}, h["step"]


def test_export_holds_base_and_mixture_and_serves_generation(sparse_runs, workspace):
    export = sparse_runs["two_ranks"] / "merged" / "model"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors",
                                                 "model-00002-of-00002.safetensors"}
    assert json.loads((export / "mixture_config.json").read_text())["config"]["method"] == "moa-sparse"
    model, tokenizer, _ = load_for_generation(ModelArguments(), GenerateArguments(model_path=str(export)))
    # The same logits as the base the run started from with the final checkpoint's mixture attached.
    checkpoint = sparse_runs["two_ranks"] / "checkpoints" / f"step-{STEPS}"
    reference, _, _ = load_for_generation(ModelArguments(model_name_or_path=str(workspace.base)),
                                       GenerateArguments(model_path=str(checkpoint)))
    ids = tokenizer("name[Aromi] food[Chinese] =>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
