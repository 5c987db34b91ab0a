"""The post-training merge, as a collective: every rank takes part, replicas are checked, shards are
written in parallel.

OUTPUT/merged/adapter/: the averaged mixture as a PEFT LoRA adapter (LoRA methods) or a one-expert
mixture checkpoint (adapter methods). OUTPUT/merged/model/ (LoRA methods): the full model with the
averaged delta folded into its weights, as sharded safetensors that `from_pretrained` reads: rank r
gathers the parameters of its contiguous share and writes shard r + 1; rank 0 writes the index,
config and tokenizer.

The routed methods (MoA, MoE-LoRA) have input-dependent routers, so nothing is averaged:
OUTPUT/merged/model/ holds the unchanged base (written the same shard-aware way) together with the
full mixture checkpoint, which `generation.load_for_generation` serves.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import distributed
from ..config import ADAMIX, ROUTED
from ..distributed.quantized_weights import dequantized_weight, quantized_linears, weight_numel
from ..distributed.sharded import full_numel, gathered
from ..distributed.storage import agreed_writes, require_free_space
from ..methods.adamix.merging import merge_experts
from ..methods.adamix.mixture_set import MixtureSet
from ..methods.hooks import HookedMixtures
from .mixture_checkpoint import save_mixtures
from .peft_adapter import export_peft_adapter

logger = logging.getLogger(__name__)
INDEX_NAME = "model.safetensors.index.json"


def _saved_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """State-dict entries to save, each tied parameter once (under its first name)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    seen: set[int] = set()
    entries = []
    for name in model.state_dict(keep_vars=True):
        tensor = params.get(name, buffers.get(name))
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        entries.append((name, tensor))
    return entries


def _owners(sizes: list[int], world: int) -> list[int]:
    """Contiguous split of entries of these sizes into `world` shares of about equal size."""
    total, owners, acc = sum(sizes), [], 0
    for size in sizes:
        owners.append(min(world - 1, acc * world // max(total, 1)))
        acc += size
    return owners


def folded_deltas(mixtures: MixtureSet) -> dict[str, tuple[torch.Tensor, bool]]:
    """{base weight name: (averaged LoRA delta (out, in), stored transposed?)} for every target."""
    return {
        f"{t.name}.weight": (m.delta_weight().detach().float().cpu(), t.transposed)
        for t, m in zip(mixtures.targets, mixtures.mixtures)
    }


def _plain_config(model: nn.Module):
    """The model's config as an unquantized checkpoint's (its weights are written dequantized)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def write_merged_model(model: nn.Module, deltas: dict, directory: Path, tokenizer=None) -> Path:
    """Collective: the full model with each weight W + delta (see folded_deltas), one safetensors shard per rank.

    A quantized base's weights are written dequantized (W is what its matmuls used), in the dtype of the model's
    unquantized weights, with a config that loads without bitsandbytes."""
    rank, world = distributed.rank(), distributed.world_size()
    with agreed_writes(f"creating {directory}"):
        directory.mkdir(parents=True, exist_ok=True)
    entries = _saved_tensors(model)
    lost = sorted(set(deltas) - {name for name, _ in entries})
    if lost:
        raise ValueError(f"merged weights {lost} are not saved under their own name (tied to another weight?); "
                         "their LoRA delta would be lost")
    quantized = quantized_linears(model)
    dtype = model.get_input_embeddings().weight.dtype
    sizes = [weight_numel(quantized[name]) if name in quantized else full_numel(t) for name, t in entries]
    owners = _owners(sizes, world)
    total = sum(size * (dtype.itemsize if name in quantized else t.element_size())
                for (name, t), size in zip(entries, sizes))
    require_free_space(directory, total, f"writing the merged model {directory}")
    shard_name = f"model-{rank + 1:05d}-of-{world:05d}.safetensors"
    shard = {}
    for (name, tensor), owner in zip(entries, owners):
        with gathered([tensor]):
            if owner == rank:
                if name in quantized:
                    value = dequantized_weight(quantized[name], dtype).to("cpu")
                else:
                    value = tensor.detach().to("cpu", copy=True)
                if name in deltas:
                    delta, transposed = deltas[name]
                    value = (value.float() + (delta.T if transposed else delta)).to(value.dtype)
                shard[name] = value.contiguous()
    with agreed_writes(f"writing the merged model {directory}"):
        save_file(shard, directory / shard_name,
                  metadata={"format": "pt", "written_by": f"rank {rank} of {world} on {socket.gethostname()}"})
        if rank == 0:
            weight_map = {name: f"model-{o + 1:05d}-of-{world:05d}.safetensors"
                          for (name, _), o in zip(entries, owners)}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
            _plain_config(model).save_pretrained(directory)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
    return directory


def export_with_mixtures(model: nn.Module, mixtures: HookedMixtures, output_dir: Path, tokenizer=None,
                         base_model_name_or_path: str | None = None) -> dict[str, str]:
    """Collective: the base model and the whole mixture (routers and every expert) in merged/model (the base is
    written there whole, so its name is not needed)."""
    distributed.check_replicas_agree([p for _, p in mixtures.named_tensors()], "mixture weights")
    model_dir = write_merged_model(model, {}, Path(output_dir) / "merged" / "model", tokenizer)
    with agreed_writes(f"writing the mixture beside the model in {model_dir}"):
        if distributed.is_main():
            save_mixtures(mixtures, model_dir)
    return {"model": str(model_dir)}


def merge_and_export(model: nn.Module, mixtures: HookedMixtures, output_dir: Path, tokenizer=None,
                     base_model_name_or_path: str | None = None) -> dict[str, str]:
    """Collective: check the replicas agree, average the experts, write merged/adapter and merged/model."""
    distributed.check_replicas_agree([p for _, p in mixtures.named_tensors()], "mixture weights")
    merged = merge_experts(mixtures)
    out = {}
    adapter_dir = Path(output_dir) / "merged" / "adapter"
    with agreed_writes(f"writing the merged adapter {adapter_dir}"):
        if distributed.is_main():
            if mixtures.config.is_lora:
                export_peft_adapter(merged, adapter_dir, base_model_name_or_path)
            else:
                save_mixtures(merged, adapter_dir)
    out["adapter"] = str(adapter_dir)
    if mixtures.config.is_lora:
        model_dir = Path(output_dir) / "merged" / "model"
        out["model"] = str(write_merged_model(model, folded_deltas(merged), model_dir, tokenizer))
    else:
        logger.info("adapter methods have no folded full model (an adapter is not a weight delta); "
                    "serve base + merged/adapter")
    return out


EXPORTS = {ADAMIX: merge_and_export, ROUTED: export_with_mixtures}
"""What each family of mixtures leaves after training (config.METHODS says which family a method is)."""


def export_mixtures(model: nn.Module, mixtures: HookedMixtures, output_dir: Path, tokenizer=None,
                    base_model_name_or_path: str | None = None) -> dict[str, str]:
    """Collective: the export of the mixtures' family."""
    return EXPORTS[mixtures.config.family](model, mixtures, output_dir, tokenizer, base_model_name_or_path)
