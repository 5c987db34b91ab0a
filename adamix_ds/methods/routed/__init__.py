"""Methods whose experts are gated per token by a learned router: heterogeneous MoA (soft and sparse) and the
homogeneous MoE-LoRA baselines (molora, hydralora, topk-lora)."""
