"""Training-checkpoint rules that need no launch: pruning, refusing a changed run, optimizer round trip."""

import pytest
import torch
from conftest import batch, make_model, tiny_mixtures

from adamix_ds import MixtureConfig, MixtureSet, causal_lm_losses
from adamix_ds.config import ConfigError
from adamix_ds.training.checkpoints import (
    COMPLETE_MARKER,
    TrainerState,
    complete_checkpoints,
    find_resume_checkpoint,
    load_replicated_state,
    prune_checkpoints,
    read_trainer_state,
    save_checkpoint,
    write_replicated_state,
)


def _fake_checkpoint(root, step, complete=True):
    path = root / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE_MARKER).write_text("ok\n")
    return path


def test_auto_resume_ignores_incomplete_and_pruning_keeps_the_new_one(tmp_path):
    for step in (10, 20):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 30, complete=False)
    assert find_resume_checkpoint(tmp_path, "auto").name == "step-20"
    written = _fake_checkpoint(tmp_path, 15)  # a resumed run saving below an abandoned step-20
    prune_checkpoints(tmp_path, 1, written)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-15", "step-20"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-30"))


def test_a_changed_seed_or_batch_plan_is_refused():
    state = TrainerState(step=10, routing_seed=7, consumed_examples=160)
    state.check_continues("ckpt", seed=7, global_batch=16)
    with pytest.raises(ConfigError, match="trained with --seed 7, this run has 8"):
        state.check_continues("ckpt", seed=8, global_batch=16)
    with pytest.raises(ConfigError, match="16 per step\\); this run's global batch is 32"):
        state.check_continues("ckpt", seed=7, global_batch=32)


def test_optimizer_and_schedule_round_trip(tmp_path):
    from deepspeed.runtime.lr_schedules import WarmupLR

    model, mixtures = tiny_mixtures("llama", seed=3, num_experts=2)
    optimizer = torch.optim.AdamW(mixtures.parameters(), lr=0.01)
    scheduler = WarmupLR(optimizer, warmup_max_lr=0.01, warmup_num_steps=5, warmup_type="linear")
    model.train()
    for step in range(3):
        mixtures.router.step = step
        causal_lm_losses(model, batch(), batch(), router=mixtures.router).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    save_checkpoint(tmp_path, TrainerState(3, 3, 12),
                    lambda directory: write_replicated_state(directory, mixtures, optimizer, scheduler), keep=2)
    fresh_model = make_model("llama")
    fresh = MixtureSet.inject(fresh_model, MixtureConfig(num_experts=2), seed=3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    fresh_sched = WarmupLR(fresh_opt, warmup_max_lr=0.01, warmup_num_steps=5, warmup_type="linear")
    state, record = read_trainer_state(tmp_path / "checkpoints" / "step-3")
    assert state == TrainerState(3, 3, 12)
    load_replicated_state(tmp_path / "checkpoints" / "step-3", record, fresh, fresh_opt, fresh_sched)
    assert fresh_sched.last_batch_iteration == scheduler.last_batch_iteration
    for p, q in zip(mixtures.parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], fresh_opt.state[q][key], rtol=0, atol=0)


def test_every_file_reaches_the_disk_before_the_complete_marker(tmp_path, monkeypatch):
    """fsync order of a save: each data file, then the marker, then its directory, then (renamed) the parent."""
    import os

    from adamix_ds.training import checkpoints as train_checkpoint

    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(train_checkpoint.os, "fsync", recording_fsync)
    model, mixtures = tiny_mixtures("llama", seed=3, num_experts=2)
    optimizer = torch.optim.AdamW(mixtures.parameters(), lr=0.01)
    final = save_checkpoint(tmp_path, TrainerState(3, 3, 12),
                            lambda directory: write_replicated_state(directory, mixtures, optimizer, None), keep=None)
    names = [os.path.basename(p) for p in synced]
    files = sorted(p.name for p in final.iterdir() if p.name != COMPLETE_MARKER)
    assert len(files) >= 4 and sorted(names[:len(files)]) == files
    tmp_dir = os.path.dirname(synced[0])
    assert synced[len(files):] == [os.path.join(tmp_dir, COMPLETE_MARKER), tmp_dir, str(final.parent)]


def test_random_eval_draws_anew_on_every_evaluation_forward():
    model, mixtures = tiny_mixtures("llama", seed=2, scale=0.2, num_experts=4, share="none")
    mixtures.router.set_eval_mode("random")
    model.eval()
    with torch.no_grad():
        losses = {causal_lm_losses(model, batch(), batch()).mean().item() for _ in range(4)}
    assert len(losses) > 1
    assert mixtures.router.forwards == 4
