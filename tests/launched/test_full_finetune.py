"""--method full in a standard DeepSpeed ZeRO-3 engine: 2 ranks against 1, resume, a loadable model."""

import shutil

import pytest
import torch
from launching import run_entry, run_record, train_losses
from transformers import AutoModelForCausalLM

STEPS = 4


def _args(ws, out, micro, extra=()):
    return ["--method", "full", "--model_name_or_path", str(ws.base), "--data_path", str(ws.data),
            "--output_dir", str(out), "--max_seq_length", "40", "--max_steps", str(STEPS), "--logging_steps", "1",
            "--learning_rate", "1e-3", "--warmup_steps", "1", "--per_device_train_batch_size", str(micro),
            "--eval_split_ratio", "0.1", *extra]


@pytest.fixture(scope="module")
def runs(workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    out = {name: root / name for name in ("two_ranks", "one_rank", "resumed")}
    run_entry("train.py", _args(workspace, out["two_ranks"], 2, ("--save_steps", "2")), ranks=2)
    run_entry("train.py", _args(workspace, out["one_rank"], 4, ("--merge_at_end", "false")))
    shutil.copytree(out["two_ranks"] / "checkpoints" / "step-2", out["resumed"] / "checkpoints" / "step-2")
    run_entry("train.py", _args(workspace, out["resumed"], 2, ("--resume_from_checkpoint", "auto")), ranks=2)
    return out


def test_two_ranks_equal_one_rank_and_resume_is_exact(runs):
    two, one, resumed = (train_losses(runs[k]) for k in ("two_ranks", "one_rank", "resumed"))
    assert sorted(two) == [1, 2, 3, 4]
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert sorted(resumed) == [3, 4]
    for step in resumed:
        assert resumed[step] == pytest.approx(two[step], abs=1e-6), step
    record = run_record(runs["two_ranks"])
    assert record["parameters"]["trained_percent"] == 100.0
    assert record["base_partition"]["zero_stage"] == 3


def test_merged_model_is_the_trained_model(runs, workspace):
    trained = AutoModelForCausalLM.from_pretrained(runs["two_ranks"] / "merged" / "model")
    resumed = AutoModelForCausalLM.from_pretrained(runs["resumed"] / "merged" / "model")
    base = AutoModelForCausalLM.from_pretrained(workspace.base)
    changed = [name for name, p in trained.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[name])]
    assert len(changed) == len(list(base.parameters()))
    for (name, p), q in zip(trained.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_the_exported_model_gives_the_logged_final_eval_loss(runs, workspace, tmp_path, monkeypatch):
    """The merged model, loaded plainly, on the same held-out split (re-made here from the same seed) gives the
    token-mean eval loss the run logged at its end: the export is the model that was evaluated."""
    from adamix_ds.arguments import DataArguments, ModelArguments
    from adamix_ds.data.batching import collate
    from adamix_ds.data.tokenization import train_eval_datasets
    from adamix_ds.data.tokenizer import load_tokenizer
    from adamix_ds.training.full_trainer import logits_ce_sum

    monkeypatch.setenv("ADAMIX_DS_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(workspace.base)))
    data = DataArguments(data_path=str(workspace.data), max_seq_length=40, eval_split_ratio=0.1)
    _, held_out = train_eval_datasets(data, tokenizer, seed=42)
    model = AutoModelForCausalLM.from_pretrained(runs["two_ranks"] / "merged" / "model").eval()
    tokens, total = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(held_out), 8):
            batch = collate([held_out[i] for i in range(start, min(start + 8, len(held_out)))], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            count, ce = logits_ce_sum(logits, batch["labels"])
            tokens, total = tokens + count, total + ce.item()
    logged = run_record(runs["two_ranks"])["final_eval"]["eval/model/loss"]
    assert total / tokens == pytest.approx(logged, abs=1e-4)
