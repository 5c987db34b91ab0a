"""Export a merged mixture LoRA as a PEFT LoRA adapter that `peft.PeftModel.from_pretrained` loads."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..methods.adamix.merging import average_experts
from ..methods.adamix.mixture_set import MixtureSet

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def export_peft_adapter(mixtures: MixtureSet, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Average the experts (if there are several) and write adapter_config.json + adapter_model.safetensors.

    Keys follow PEFT's layout, base_model.model.<target>.lora_{A,B}.weight with A: (r, in) and
    B: (out, r); targets are listed by full module name, so PEFT wraps exactly the same layers.
    """
    config = mixtures.config
    if not config.is_lora:
        raise ValueError(f"PEFT export is for LoRA methods; --method {config.method} has no PEFT LoRA form")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target, mixture in zip(mixtures.targets, mixtures.mixtures):
        merged = average_experts({"A": mixture.lora_A.detach(), "B": mixture.lora_B.detach()})
        prefix = f"base_model.model.{target.name}"
        tensors[f"{prefix}.lora_A.weight"] = merged["A"][0].to("cpu").contiguous()
        tensors[f"{prefix}.lora_B.weight"] = merged["B"][0].to("cpu").contiguous()
    transposed = {t.transposed for t in mixtures.targets}
    if len(transposed) > 1:
        raise ValueError("PEFT keeps one fan_in_fan_out flag per adapter; targets mix Linear and Conv1D layers")
    save_file(tensors, directory / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": [t.name for t in mixtures.targets],
        "fan_in_fan_out": transposed.pop(),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (directory / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    return directory
