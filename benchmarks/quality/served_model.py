"""Scoring one fine-tuned run as it would be served: `python -m quality.served_model --run_dir ...`
(with benchmarks/ on PYTHONPATH, as the runner starts it).

Serving modes: `model` is the run's exported model directory (full fine-tuning, LoRA folded into the
base, or a routed method's base + mixture); `merged` is AdaMix's averaged experts (folded for LoRA,
base + merged adapter otherwise); `random` is the newest mixture checkpoint with one expert drawn per
example on every forward (AdaMix's stochastic inference).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adamix_ds.arguments import ModelArguments
from adamix_ds.export.generation import GenerateArguments, load_for_generation
from adamix_ds.training.checkpoints import find_resume_checkpoint

from .scoring import score_split

MODES = ("model", "merged", "random")


def served_model(run_dir: Path, base_dir: Path, mode: str):
    """(model, tokenizer, mixtures or None) of a run in a serving mode."""
    merged = run_dir / "merged"
    if mode == "random":
        path, eval_mode = find_resume_checkpoint(run_dir, "auto"), "random"
        if path is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint to route at random")
    elif (merged / "model" / "config.json").is_file():
        path, eval_mode = merged / "model", "merged"
    else:
        path, eval_mode = merged / "adapter", "merged"
    model_args = ModelArguments(model_name_or_path=str(base_dir))
    return load_for_generation(model_args, GenerateArguments(model_path=str(path), eval_mode=eval_mode))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_dir", required=True, type=Path)
    parser.add_argument("--base", required=True, type=Path, help="The pretrained base model directory.")
    parser.add_argument("--task", required=True)
    parser.add_argument("--split", action="append", required=True, help="NAME=PATH of a jsonl split (repeatable).")
    parser.add_argument("--modes", default="model")
    parser.add_argument("--max_new_tokens", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    scores: dict = {}
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {', '.join(MODES)}")
        torch.manual_seed(0)
        model, tokenizer, mixtures = served_model(args.run_dir, args.base, mode)
        for item in args.split:
            name, _, path = item.partition("=")
            start = time.perf_counter()
            metrics, predictions = score_split(model, tokenizer, args.task, Path(path), args.max_new_tokens,
                                               args.batch_size, router=mixtures.router if mode == "random" else None)
            scores[f"{mode}/{name}"] = {**metrics, "examples": len(predictions),
                                        "seconds": time.perf_counter() - start}
            (args.run_dir / f"predictions-{mode}-{name}.jsonl").write_text(
                "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    (args.run_dir / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
