"""Training checkpoints: everything needed to continue a run exactly, written atomically, for every family.

OUTPUT_DIR/checkpoints/step-N/ holds trainer_state.json (step, routing seed, data position, and what the
family adds) beside the family's own state: for replicated mixtures the mixtures (mixture_checkpoint
format), the optimizer state (safetensors) and the schedule; for --method full DeepSpeed's partitioned
checkpoint. No RNG state is needed: routes and dropout seeds are functions of (seed, step, rank).
The family writes into a temporary directory; rank 0 then flushes every file to disk, adds a COMPLETE
marker, and renames it into place (publish_checkpoint), so neither a kill during a save nor a node that
loses power afterwards leaves a directory that resume would pick with missing or torn contents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .. import distributed
from ..config import ConfigError
from ..distributed.storage import StorageError, agreed_writes, require_free_space
from ..export.mixture_checkpoint import (
    WEIGHTS_NAME,
    check_config_matches,
    load_state_strict,
    read_mixture_config,
    save_mixtures,
)
from ..methods.hooks import HookedMixtures

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """Where a run stands: the next step to take, the seed its routes derive from, examples consumed."""

    step: int
    routing_seed: int
    consumed_examples: int

    def check_continues(self, path, seed: int, global_batch: int) -> None:
        """Refuse to continue with another seed or batch plan: routes or data order would silently change."""
        if self.routing_seed != seed:
            raise ConfigError(f"checkpoint {path} was trained with --seed {self.routing_seed}, this run has {seed}")
        if self.consumed_examples != self.step * global_batch:
            raise ConfigError(
                f"checkpoint {path} consumed {self.consumed_examples} examples in {self.step} steps "
                f"({self.consumed_examples // max(self.step, 1)} per step); this run's global batch is {global_batch}. "
                "Resume with the same micro-batch x accumulation x ranks"
            )


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(output_dir, state: TrainerState, write_contents: Callable[[Path], dict],
                    keep: int | None, collective_bytes: int | None = None) -> Path:
    """Collective: every rank calls write_contents(tmp), which writes what that rank holds of the state and
    returns the entries trainer_state.json adds (rank 0's count); rank 0 then writes trainer_state.json,
    publishes step-N atomically and prunes to the newest `keep` checkpoints.

    A write_contents with collectives of its own (DeepSpeed's engine checkpoint) cannot have its failures exchanged
    without mismatching those collectives: its `collective_bytes` per rank are checked as free space by every rank
    before it starts instead."""
    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{state.step}", root / f".tmp-step-{state.step}"
    what = f"saving checkpoint {final}"
    survives = what_survives(output_dir) + "; free space, then continue with --resume_from_checkpoint auto"
    try:
        with agreed_writes(what, survives):
            if distributed.is_main():
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
        if collective_bytes is not None:
            require_free_space(root, collective_bytes, what, survives)
            record = write_contents(tmp)
        else:
            with agreed_writes(what, survives):
                record = write_contents(tmp)
        with agreed_writes(what, survives):
            if distributed.is_main():
                (tmp / STATE_NAME).write_text(json.dumps({"trainer": asdict(state), **record}, indent=2) + "\n")
                publish_checkpoint(tmp, final)
                prune_checkpoints(output_dir, keep, final)
    except StorageError:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # the partial save, to give the space back
        raise
    return final


def what_survives(output_dir) -> str:
    """The newest complete checkpoint, in words (for a failure's message)."""
    complete = complete_checkpoints(output_dir)
    if not complete:
        return "no checkpoint is complete yet"
    return f"checkpoints up to {complete[-1].name} are complete ({complete[-1]})"


def write_replicated_state(directory: Path, mixtures: HookedMixtures, optimizer, scheduler) -> dict:
    """The state of replicated mixtures (identical on every rank, so written by rank 0 alone): the mixtures,
    the optimizer's tensors, and for trainer_state.json the schedule and the optimizer's parameter groups."""
    if not distributed.is_main():
        return {}
    save_mixtures(mixtures, directory)
    tensors, param_groups = _flatten_optimizer(optimizer)
    save_file(tensors, directory / OPTIMIZER_NAME)
    return {"scheduler": scheduler.state_dict() if scheduler is not None else None,
            "optimizer_param_groups": param_groups}


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Flush every file under `tmp` to disk, then add the COMPLETE marker and rename `tmp` to `final`.

    Without the flushes a crash of the node soon after the rename can leave a marked checkpoint whose
    files were never written out (the rename and the marker reach the disk before the data does).
    """
    for path in sorted(tmp.rglob("*")):
        _fsync(path)
    (tmp / COMPLETE_MARKER).write_text("ok\n")
    _fsync(tmp / COMPLETE_MARKER)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    """fsync a file, or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(output_dir, keep: int | None, written: Path) -> None:
    """Keep the newest `keep` complete checkpoints, and never the one just written."""
    if not keep:
        return
    for old in complete_checkpoints(output_dir)[:-keep]:
        if old != written:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(output_dir, spec: str | None) -> Path | None:
    """--resume_from_checkpoint: None, 'auto' (newest complete checkpoint, if any) or a directory."""
    if spec is None:
        return None
    if spec == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint directory")
    return path


def read_trainer_state(path: Path) -> tuple[TrainerState, dict]:
    """(where the run stood, the whole trainer_state.json record) of a checkpoint."""
    record = json.loads((path / STATE_NAME).read_text())
    return TrainerState(**record["trainer"]), record


def load_replicated_state(path: Path, record: dict, mixtures: HookedMixtures, optimizer, scheduler) -> None:
    """Restore mixtures (strictly), optimizer and schedule written by write_replicated_state."""
    saved_config, _, _ = read_mixture_config(path)
    check_config_matches(saved_config, mixtures.config)
    load_state_strict(mixtures, load_file(str(path / WEIGHTS_NAME)))
    tensors = load_file(str(path / OPTIMIZER_NAME))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, record["optimizer_param_groups"]))
    if (scheduler is None) != (record["scheduler"] is None):
        raise ValueError(f"{path}: the checkpoint {'has' if record['scheduler'] else 'has no'} schedule state, "
                         f"this run {'has a' if scheduler else 'has no'} scheduler")
    if scheduler is not None:
        scheduler.load_state_dict(record["scheduler"])
