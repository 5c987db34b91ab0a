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
            "--learning_rate", "1e-3", "--warmup_steps", "1", "--per_device_train_batch_size", str(micro), *extra]


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
