"""Mixture checkpoints: safetensors weights + a JSON config, loaded back strictly.

The reference implementation loads non-strictly, so a checkpoint saved with other experts or sharing
silently drops weights; here any missing or unexpected key, shape mismatch or config mismatch is an
error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import MixtureConfig
from ..methods.hooks import HookedMixtures
from ..methods.registry import mixture_class

WEIGHTS_NAME = "mixtures.safetensors"
CONFIG_NAME = "mixture_config.json"
FORMAT_VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model or configuration it is loaded into."""


def save_mixtures(mixtures: HookedMixtures, directory: str | Path) -> Path:
    """Write WEIGHTS_NAME (keys: module name + '.' + parameter) and CONFIG_NAME into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in mixtures.named_tensors()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "adamix_ds": str(FORMAT_VERSION)})
    meta = {
        "format_version": FORMAT_VERSION,
        "config": mixtures.config.to_dict(),
        "seed": mixtures.seed,
        **mixtures.describe(),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_mixture_config(directory: str | Path) -> tuple[MixtureConfig, dict, int]:
    """(config, the saved structure description, routing seed) of a mixture checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointMismatch(f"{path} not found: not a mixture checkpoint directory")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatch(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return MixtureConfig.from_dict(meta["config"]), meta, meta["seed"]


def check_config_matches(saved: MixtureConfig, requested: MixtureConfig) -> None:
    """Refuse a checkpoint whose structure differs from the requested one; name every differing field."""
    structural = ("method", "num_experts", "share", "lora_r", "lora_alpha", "adapter_size",
                  "adapter_activation", "adapter_after_attention", "moa_experts", "router_type", "prompt_length",
                  "top_k")
    diffs = [
        f"{name}: checkpoint {getattr(saved, name)!r} vs requested {getattr(requested, name)!r}"
        for name in structural
        if getattr(saved, name) != getattr(requested, name)
    ]
    if diffs:
        raise CheckpointMismatch("mixture checkpoint does not match the requested configuration: " + "; ".join(diffs))


def load_state_strict(mixtures: HookedMixtures, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `mixtures`; every key must exist on both sides with the same shape."""
    own = dict(mixtures.named_tensors())
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)"
        )
    for name in sorted(set(own) & set(state)):
        if own[name].shape != state[name].shape:
            problems.append(f"shape of {name}: checkpoint {tuple(state[name].shape)} vs model {tuple(own[name].shape)}")
    if problems:
        raise CheckpointMismatch("mixture weights do not load strictly: " + "; ".join(problems))
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])


def load_mixtures(model: nn.Module, directory: str | Path, expected: MixtureConfig | None = None,
                  attach: bool = True) -> HookedMixtures:
    """Rebuild the mixtures saved in `directory` on `model` (strictly) and attach them.

    With `expected`, a checkpoint of another structure is refused before any weight is read.
    """
    config, description, seed = read_mixture_config(directory)
    if expected is not None:
        check_config_matches(config, expected)
    mixtures = mixture_class(config).from_description(config, description, seed)
    modules = dict(model.named_modules())
    absent = [name for name in mixtures.module_names() if name not in modules]
    if absent:
        raise CheckpointMismatch(f"checkpoint modules missing from the model: {absent[:5]} ({len(absent)} in all)")
    load_state_strict(mixtures, load_file(str(Path(directory) / WEIGHTS_NAME)))
    if attach:
        mixtures.attach(model)
    return mixtures
