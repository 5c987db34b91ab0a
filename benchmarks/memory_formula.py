"""Per-rank memory of a mixture run under ZeRO-3, from the model's shapes: docs/memory.md's formula, for Llama-3 8B
and 70B at 8 and 64 ranks, and for large:llama at 2 ranks beside what benchmarks/zero3_memory.py measured.

    python benchmarks/memory_formula.py [--method adamix-lora] [--seq 4096] [--micro 1]

Every count comes from the model itself, built on the meta device (no memory, no download): parameters of the
base, of its linear layers (what 4-bit quantizes) and of its largest decoder layer; the mixture's trainable
parameters; and the bytes autograd saves for the backward in one forward of a decoder layer with the mixture
attached (saved-tensor hooks; weights kept for the backward are not new memory and are not counted; attention
counted as a fused kernel keeps it: q, k, v, output, log-sum-exp), times the layers. Writes benchmarks/results/memory_formula.json and prints the Markdown table.

    per rank = base / W                           (ZeRO-3 partitions; 4-bit: 0.516 bytes per linear weight)
             + 2 decoder layers gathered          (stage3_max_live_parameters "auto": at most 1e9 parameters)
             + mixtures x 16 bytes                (fp32 weights, gradients, AdamW's two moments; replicated)
             + activations saved for the backward (per micro-batch; --gradient_checkpointing: the layer inputs
                                                   and one layer's activations)
             + 2 x loss chunk x vocabulary x 4    (one chunk's fp32 logits and their gradient)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from adamix_ds import MixtureConfig
from adamix_ds.builtin_models import builtin_config
from adamix_ds.distributed.ds_config import MAX_GATHERED
from adamix_ds.distributed.sharded_base import largest_layer_numel
from adamix_ds.methods.registry import inject_mixtures

RESULTS = Path(__file__).resolve().parent / "results"
MEASURED = RESULTS / "zero3_memory"
GB = 1e9
LLAMA_3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
MODELS = {
    "Llama-3 8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, **LLAMA_3),
    "Llama-3 70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, **LLAMA_3),
}
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8
"""Bytes per 4-bit weight with double quantization: the code, an 8-bit scale per block of 64, an fp32 scale per
256 scales (QLoRA, Sec. 3)."""
LOSS_CHUNK = 1024


def model_shapes(config, method: str, micro: int, seq: int, dtype: torch.dtype) -> dict:
    """Parameter counts and saved-activation bytes of one micro-batch, on a meta-device model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    layer = largest_layer_numel(model)  # what the "auto" ZeRO-3 limits are sized from
    mixtures = inject_mixtures(model, MixtureConfig(method=method), seed=0).to("meta")
    trained = sum(p.numel() for p in mixtures.parameters() if p.requires_grad)
    saved = [0]

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter) and not isinstance(tensor._base, torch.nn.Parameter):
            saved[0] += tensor.numel() * tensor.element_size()  # a weight kept for the backward is no new memory
        return tensor

    def fused_attention(query, key, value, *args, **kwargs):
        """What a fused kernel (flash, memory-efficient) keeps: q, k, v, the output and the log-sum-exp per row;
        on the meta device sdpa would take its math path and keep the score matrices."""
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
            out = sdpa(query, key, value, *args, **kwargs)
        saved[0] += sum(t.numel() * t.element_size() for t in (query, key, value, out))
        saved[0] += query.shape[0] * query.shape[1] * query.shape[2] * 4
        return out

    model.train()
    hidden = torch.empty(micro, seq, config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    positions = torch.arange(seq, device="meta")[None].expand(micro, seq)
    rotary = model.base_model.rotary_emb(hidden, positions)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layers[1](hidden, position_embeddings=rotary, position_ids=positions, use_cache=False)
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return {"base": sum(p.numel() for p in model.parameters()), "linear": linear, "layer": layer,
            "layers": len(layers), "hidden": config.hidden_size, "vocab": config.vocab_size, "trained": trained,
            "activations": saved[0] * len(layers), "element": torch.finfo(dtype).bits // 8}


def per_rank(shapes: dict, world: int, micro: int, seq: int, quantized: bool, checkpointing: bool) -> dict:
    """The formula's terms in GB."""
    element = shapes["element"]
    if quantized:
        base = shapes["linear"] * NF4_BYTES + (shapes["base"] - shapes["linear"]) * element
    else:
        base = shapes["base"] * element
    # stage3_max_live_parameters "auto" (never less than the layer that runs). The limit counts stored elements,
    # and a 4-bit weight packs several codes into one, so a 4-bit base may keep as many bytes gathered.
    gathered = min(max(shapes["layer"], min(MAX_GATHERED, 2 * shapes["layer"])) * element, base)
    activations = shapes["activations"]
    if checkpointing:
        per_layer = activations / shapes["layers"]
        activations = shapes["layers"] * micro * seq * shapes["hidden"] * element + per_layer
    terms = {"base / W": base / world, "gathered": gathered, "mixtures": shapes["trained"] * 16,
             "activations": activations, "loss chunk": 2 * min(LOSS_CHUNK, micro * seq) * shapes["vocab"] * 4}
    terms = {k: v / GB for k, v in terms.items()}
    terms["total"] = sum(terms.values())
    terms["load peak (4-bit: whole base)"] = base / GB if quantized else None
    return terms


def measured(name: str) -> dict | None:
    path = MEASURED / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    rank0 = record["ranks"][0]
    return {"peak_gb": max(p["peak_gb"] for p in rank0["phases"]), "partitions_gb": rank0["phases"][-1].get(
        "partitions_gb"), "peak_gathered_gb": rank0["peak_gathered_gb"], "started_gb": rank0["phases"][0]["now_gb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="adamix-lora")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=1)
    args = parser.parse_args()
    rows = []
    for name, sizes in MODELS.items():
        config = AutoConfig.for_model("llama", **sizes)
        shapes = model_shapes(config, args.method, args.micro, args.seq, torch.bfloat16)
        for quantized in (False, True):
            for checkpointing in (False, True):
                for world in (8, 64):
                    rows.append({"model": name, "base_dtype": "4-bit nf4" if quantized else "bf16", "ranks": world,
                                 "gradient_checkpointing": checkpointing, "seq": args.seq, "micro": args.micro,
                                 **per_rank(shapes, world, args.micro, args.seq, quantized, checkpointing)})
    check = {}
    shapes = model_shapes(builtin_config("large:llama", 32000), args.method, 1, 64, torch.float32)
    check["large:llama fp32, 2 ranks, 64 tokens"] = {
        "formula": per_rank(shapes, 2, 1, 64, quantized=False, checkpointing=False), "measured": measured("zero3")}
    shapes_bf16 = {**shapes, "element": 2}
    check["large:llama bf16, 2 ranks, 64 tokens"] = {
        "formula": per_rank(shapes_bf16, 2, 1, 64, quantized=False, checkpointing=False),
        "measured": measured("zero3-bf16")}
    check["large:llama 4-bit, 2 ranks, 64 tokens"] = {
        "formula": per_rank(shapes_bf16, 2, 1, 64, quantized=True, checkpointing=False),
        "measured": measured("zero3-4bit-from-directory")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_formula.json").write_text(json.dumps({"method": args.method, "rows": rows, "check": check},
                                                            indent=2) + "\n")
    print("| model | base | ranks | checkpointing | base / W | gathered | mixtures | activations | loss chunk | "
          "total GB | 4-bit load peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        load = row["load peak (4-bit: whole base)"]
        print(f"| {row['model']} | {row['base_dtype']} | {row['ranks']} | {'yes' if row['gradient_checkpointing'] else 'no'} "
              f"| {row['base / W']:.2f} | {row['gathered']:.2f} | {row['mixtures']:.3f} | {row['activations']:.2f} "
              f"| {row['loss chunk']:.2f} | {row['total']:.1f} | {'' if load is None else f'{load:.1f}'} |")
    print(json.dumps(check, indent=1))


if __name__ == "__main__":
    main()
