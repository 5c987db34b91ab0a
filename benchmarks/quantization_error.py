"""What quantizing a base costs before any training: the relative error of its linear weights and the held-out
loss of the default task's completions, unquantized against --quantization_bit 4 (nf4, fp4) and 8.

    python benchmarks/quantization_error.py [--model_name_or_path shipped:restaurants] [--examples 100]

Writes benchmarks/results/quantization_error.json; docs/memory.md's table comes from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adamix_ds.arguments import ModelArguments
from adamix_ds.data.default_task import data_file
from adamix_ds.distributed.quantized_weights import dequantized_weight, keep_storage_layout, quantized_linears
from adamix_ds.distributed.sharded_base import _from_source

RESULTS = Path(__file__).resolve().parent / "results" / "quantization_error.json"
SETTINGS = {"4-bit nf4": (4, "nf4"), "4-bit fp4": (4, "fp4"), "8-bit": (8, "nf4")}


def completion_loss(model, tokenizer, rows) -> float:
    """Mean cross-entropy per completion token, given the prompt."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = len(tokenizer(row["prompt"])["input_ids"])
            ids = torch.tensor([tokenizer(row["prompt"] + row["completion"])["input_ids"]])
            labels = ids.clone()
            labels[0, :prompt] = -100
            count = int((labels[0, 1:] != -100).sum())
            total += model(ids, labels=labels).loss.item() * count
            tokens += count
    return total / tokens


def weight_error(model, reference: dict) -> float:
    """||W_dequantized - W|| / ||W|| over every quantized linear weight."""
    diff = norm = 0.0
    for name, layer in quantized_linears(model).items():
        weight = reference[name].detach().float()
        diff += (dequantized_weight(layer, torch.float32) - weight).pow(2).sum().item()
        norm += weight.pow(2).sum().item()
    return (diff / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default="shipped:restaurants")
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()
    path = ModelArguments(model_name_or_path=args.model_name_or_path).model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(data_file("validation")) as f:
        rows = [json.loads(line) for line in f][: args.examples]
    results = {"model": args.model_name_or_path, "examples": len(rows), "rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        weights = dict(reference.named_parameters())
        results["rows"].append({"dtype": str(dtype), "base": "unquantized", "weight_error": 0.0,
                                "loss": completion_loss(reference, tokenizer, rows)})
        for label, (bits, quant_type) in SETTINGS.items():
            options = ModelArguments(model_name_or_path=path, quantization_bit=bits, bnb_4bit_quant_type=quant_type)
            model = _from_source(options, dtype, len(tokenizer), device=torch.device("cpu")).eval()
            keep_storage_layout(model)
            results["rows"].append({"dtype": str(dtype), "base": label, "weight_error": weight_error(model, weights),
                                    "loss": completion_loss(model, tokenizer, rows)})
            print(results["rows"][-1], flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
