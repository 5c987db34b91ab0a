"""A bitsandbytes-quantized base weight read as the ordinary weight it stands for.

A 4-bit weight is stored packed (shape [n, 1], two or more codes per element) with its block scales beside it
(quant_state); an 8-bit one as int8 rows with one scale per row (SCB). Accounting counts the weight it stands
for, and the merged export writes it dequantized: the served model is the quantized base the mixtures were
trained on, as an ordinary checkpoint that loads without bitsandbytes.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .sharded import full_numel

QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")
"""bitsandbytes' parameter classes of a quantized linear layer's weight."""


def is_quantized(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in QUANTIZED_WEIGHTS and "bitsandbytes" in sys.modules


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{weight name: its linear layer} for every quantized weight of `model`."""
    return {f"{name}.weight": module for name, module in model.named_modules() if is_quantized(module)}


def weight_numel(module: nn.Module) -> int:
    """Elements of the weight the layer stands for (in x out), not of its packed storage."""
    return module.in_features * module.out_features


def base_numel(model: nn.Module) -> int:
    """Parameters of `model` as an unquantized model has them (ZeRO-3 aware)."""
    quantized = {id(module.weight): weight_numel(module) for module in quantized_linears(model).values()}
    return sum(quantized.get(id(p), full_numel(p)) for p in model.parameters())


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight (out, in) in `dtype`, as its matmul uses it. The weight must be whole (gathered)."""
    import bitsandbytes.functional as F

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        value = F.dequantize_4bit(weight.data, weight.quant_state)
    else:  # the row scales move from the weight to the layer's state at its first forward
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        value = F.int8_vectorwise_dequant(weight.data, scales)
    return value.reshape(module.out_features, module.in_features).to(dtype)


def keep_storage_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU fast path for 4-bit layers. On a CPU with AVX512-BF16 it repacks a weight in
    place at its first no-grad forward, changing the stored tensor's shape and its quant_state: under ZeRO-3 the
    partitions keep the old layout while the state describes the new one, and a layer whose out_features is not a
    multiple of 32 fails its assertion."""
    for module in quantized_linears(model).values():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def detach_from_checkpoint(model: nn.Module) -> None:
    """Copy the unquantized weights (embeddings, norms, head) of a base quantized onto the CPU. They are loaded as
    views of the memory-mapped checkpoint, which keeps the whole file's pages mapped and counted in the process's
    resident memory (1.3 GB more per rank for large:llama's 1.9 GB file: docs/memory.md)."""
    quantized = {id(module.weight) for module in quantized_linears(model).values()}
    for param in model.parameters():
        if id(param) not in quantized:
            param.data = param.data.clone()
