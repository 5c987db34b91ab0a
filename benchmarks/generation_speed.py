"""Generated tokens per second: the trainer's scoring path against transformers' generate on the merged model.

    python benchmarks/generation_speed.py --model smollm2:135m-instruct     # the packaged SmolLM2, one process

Every row decodes the same prompts greedily, in batches, exactly --max_new_tokens tokens each, in one process:
  transformers  model.generate on the merged export (the experts averaged and folded into the base, as written
                by the trainer and loaded by transformers): the anchor
  merged        what the samples, the slot accuracy and the quality study's scoring run: the base with the
                AdaMix-LoRA mixtures attached, served merged, through export.generation.complete_batch
  random        the same with random routing (each prompt's experts drawn, as the default run scores it)
The experts are random draws (B too, so the mixtures change the outputs). Rows alternate over --rounds; the first
visit is warm-up. Results: benchmarks/results/<name>.json and .md, with the share of generated tokens on which the
merged row agrees with the anchor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from adamix_ds import MixtureConfig, inject_mixtures, merge_experts
from adamix_ds.arguments import ModelArguments
from adamix_ds.data.tokenizer import load_tokenizer
from adamix_ds.distributed.ds_config import auto_bf16
from adamix_ds.export.generation import complete_batch
from adamix_ds.export.merged_model import folded_deltas, write_merged_model

ROWS = ("transformers", "merged", "random")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2:135m-instruct", help="a model with a tokenizer: a directory, a GGUF "
                                                                    "file or smollm2:135m-instruct")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt_tokens", type=int, default=24)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="visits of every row (the first is warm-up)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help='auto: bf16 where the trainer\'s bf16 "auto" picks it (a GPU, or a CPU with AMX/AVX512-BF16)')
    p.add_argument("--results_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None, help="results file name (default: generation_<device>)")
    return p.parse_args()


def randomized_mixtures(model, seed: int = 0):
    """AdaMix-LoRA (4 experts, r 4 on q and v) with every weight drawn, so that merging and routing matter."""
    mixtures = inject_mixtures(model, MixtureConfig(method="adamix-lora", num_experts=4, share="none", lora_r=4,
                                                    lora_alpha=32), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixtures.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return mixtures


def main() -> None:
    args = parse()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if auto_bf16()[0] else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_args = ModelArguments(model_name_or_path=args.model)
    tokenizer = load_tokenizer(model_args)
    base = model_args.source.load(dtype).to(device).eval()
    mixtures = randomized_mixtures(base).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        mixtures.detach()
        write_merged_model(base, folded_deltas(merge_experts(mixtures)), Path(tmp))
        mixtures.attach(base)
        anchor = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, tokenizer.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.prompts)]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or 0,
                              eos_token_id=tokenizer.eos_token_id)
    batches = [prompts[i:i + args.batch] for i in range(0, len(prompts), args.batch)]
    router = mixtures.router

    def decode(row: str) -> list[str]:
        if row == "transformers":
            return [text for batch in batches for text in complete_batch(anchor, tokenizer, batch, config)]
        router.set_eval_mode(row)
        texts = []
        for start, batch in zip(range(0, len(prompts), args.batch), batches):
            with router.keyed_rows(list(range(start, start + len(batch)))):
                texts += complete_batch(base, tokenizer, batch, config)
        return texts

    times: dict[str, list[float]] = {row: [] for row in ROWS}
    texts: dict[str, list[str]] = {}
    for visit in range(args.rounds):
        for row in ROWS:
            start = time.perf_counter()
            texts[row] = decode(row)
            if visit > 0:
                times[row].append(time.perf_counter() - start)
    tokens = args.prompts * args.max_new_tokens
    anchor_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts["transformers"]]
    merged_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts["merged"]]
    agreeing = sum(a == b for x, y in zip(anchor_ids, merged_ids) for a, b in zip(x, y))
    results = {row: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)}
               for row, t in times.items()}
    write_results(args, dtype, results, agreeing / max(1, sum(len(x) for x in anchor_ids)))


def write_results(args, dtype, results: dict, agreement: float) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    name = args.name or f"generation_{'gpu' if torch.cuda.is_available() else 'cpu'}"
    anchor = results["transformers"]["tokens_per_s"]
    lines = [f"Measured on {device}, {torch.get_num_threads()} threads, {args.model} in {str(dtype).split('.')[-1]}: "
             f"{args.prompts} prompts of {args.prompt_tokens} tokens, {args.max_new_tokens} new tokens each, batches "
             f"of {args.batch}, greedy; median of {args.rounds - 1} visits per row after warm-up. The merged row "
             f"chose the anchor's token at {100 * agreement:.1f}% of the positions.", "",
             "| row | seconds | generated tokens/s | vs transformers |", "|---|---|---|---|"]
    for row, r in results.items():
        lines.append(f"| {row} | {r['median_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / anchor:.2f} |")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    record = {"device": device, "dtype": str(dtype), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": results, "merged_agreement": agreement}
    (args.results_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.results_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
