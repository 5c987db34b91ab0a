"""Outputs that cannot be written (no space, no permission) end a job with one line that names the path, the space
needed where it is known, and what survives; a failed checkpoint save leaves the earlier ones as they were."""

import errno

import pytest
import torch
from conftest import tiny_mixtures

from adamix_ds.distributed import storage
from adamix_ds.distributed.storage import StorageError, require_free_space, size_text
from adamix_ds.export import merged_model
from adamix_ds.training.checkpoints import (
    TrainerState,
    complete_checkpoints,
    save_checkpoint,
    what_survives,
    write_replicated_state,
)


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", str(args[1]) if len(args) > 1 else None)


def _safetensors_no_space(*args, **kwargs):
    """What safetensors raises on a full disk: its own error type, not an OSError."""
    raise type("SafetensorError", (Exception,), {})("Error while serializing: No space left on device (os error 28)")


@pytest.mark.parametrize("failure", [_no_space, _safetensors_no_space])
def test_a_full_disk_while_the_merged_model_is_written_is_one_error_naming_the_file(tmp_path, monkeypatch, failure):
    model, _ = tiny_mixtures("llama", num_experts=2)
    monkeypatch.setattr(merged_model, "save_file", failure)
    with pytest.raises(StorageError) as raised:
        merged_model.write_merged_model(model, {}, tmp_path / "merged" / "model")
    message = str(raised.value)
    assert "writing the merged model" in message and "No space left on device" in message and "\n" not in message
    if failure is _no_space:
        assert "model-00001-of-00001.safetensors" in message
    else:
        assert "SafetensorError" in message


def test_the_free_space_an_export_needs_is_checked_before_it_writes(tmp_path, monkeypatch):
    model, _ = tiny_mixtures("llama", num_experts=2)
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: type("U", (), {"free": needed // 2})())
    with pytest.raises(StorageError, match=f"writing the merged model .* needs {size_text(needed)} and "
                                           f"{size_text(needed // 2)} are free"):
        merged_model.write_merged_model(model, {}, tmp_path / "merged" / "model")
    assert not list((tmp_path / "merged" / "model").glob("*.safetensors"))
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: type("U", (), {"free": 2 * needed})())
    require_free_space(tmp_path / "not" / "there" / "yet", needed, "a write")  # probes the nearest existing parent


def test_a_failed_checkpoint_save_keeps_the_earlier_ones_and_says_so(tmp_path, monkeypatch):
    _, mixtures = tiny_mixtures("llama", num_experts=2)
    optimizer = torch.optim.AdamW(mixtures.parameters(), lr=0.01)
    write = lambda directory: write_replicated_state(directory, mixtures, optimizer, None)  # noqa: E731
    first = save_checkpoint(tmp_path, TrainerState(2, 0, 8), write, keep=3)
    assert what_survives(tmp_path) == f"checkpoints up to step-2 are complete ({first})"
    from adamix_ds.training import checkpoints

    monkeypatch.setattr(checkpoints, "save_file", _no_space)
    with pytest.raises(StorageError) as raised:
        save_checkpoint(tmp_path, TrainerState(4, 0, 16), write, keep=3)
    message = str(raised.value)
    assert "saving checkpoint" in message and "step-4" in message and "No space left on device" in message
    assert f"checkpoints up to step-2 are complete ({first})" in message and "--resume_from_checkpoint auto" in message
    assert complete_checkpoints(tmp_path) == [first]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial save gave its space back
