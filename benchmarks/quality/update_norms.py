"""How far a LoRA-type run moved the base: the Frobenius norm of the served update, and of each expert's own.

The budget part's mechanism measurement. LoRA serves delta W = (alpha / r) B A; AdaMix-LoRA serves the merge
(alpha / r) mean_i(B_i) mean_i(A_i) (the reference's merging, METHOD.md), whose norm falls below its experts'
(alpha / r) B_i A_i as they spread apart. Both are summed over insertion points in quadrature, i.e. the norm of
every update at once.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_file

from adamix_ds.export.mixture_checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_mixture_config


def update_norms(checkpoint: Path) -> dict | None:
    """{"served": norm of the served (merged) update, "experts": root mean square over experts of each expert's
    update norm (expert i: A_i with B_i, or with the one B where B is shared)} of a checkpoint directory; None
    where it serves no averaged LoRA (full fine-tuning, adapters, routed mixtures)."""
    if not (Path(checkpoint) / CONFIG_NAME).is_file():
        return None
    config, _, _ = read_mixture_config(checkpoint)
    if config.method not in ("lora", "adamix-lora"):
        return None
    weights = load_file(str(Path(checkpoint) / WEIGHTS_NAME))
    downs = sorted(name for name in weights if name.endswith(".lora_A"))
    scale = config.lora_alpha / config.lora_r
    served, experts = 0.0, 0.0
    for down in downs:
        a, b = weights[down].double(), weights[down.removesuffix("A") + "B"].double()
        count = max(a.shape[0], b.shape[0])
        served += (scale * b.mean(0) @ a.mean(0)).square().sum().item()
        experts += sum((scale * b[i % b.shape[0]] @ a[i % a.shape[0]]).square().sum().item()
                       for i in range(count)) / count
    return {"served": math.sqrt(served), "experts": math.sqrt(experts)}
