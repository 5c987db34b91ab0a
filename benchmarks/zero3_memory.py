"""Where a rank's memory goes under ZeRO-3: resident memory after each phase of set-up and of the first steps,
beside what ZeRO-3 holds at that moment (this rank's partitions, the weights gathered whole, those it keeps
whole for good), for one DeepSpeed config per launch.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/zero3_memory.py --deepspeed ds_configs/zero3.json \
        --model large:llama --name zero3
    ... --bf16 --name zero3-bf16;  ... --bf16 --quantization_bit 4 --name zero3-4bit

Writes benchmarks/results/zero3_memory/<name>.json (every rank's phases). On a GPU the numbers are the CUDA
allocator's (allocated now, and its peak); on a CPU the process's resident set (VmRSS, and its peak VmHWM).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from adamix_ds import MixtureConfig, causal_lm_losses, distributed
from adamix_ds.arguments import ModelArguments, TrainArguments
from adamix_ds.cli import exit_process
from adamix_ds.distributed.ds_config import load_ds_config, resolve_ds_config
from adamix_ds.distributed.sharded_base import load_base
from adamix_ds.methods.registry import inject_mixtures

RESULTS = Path(__file__).resolve().parent / "results" / "zero3_memory"
GB = 1e9


def process_memory() -> tuple[float, float]:
    """(now, peak) in GB: CUDA allocated memory, or the resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / GB, torch.cuda.max_memory_allocated() / GB
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1e6, int(status["VmHWM"].split()[0]) / 1e6


def zero_holdings(model) -> dict:
    """GB this rank holds of the base, by kind: its partitions, weights gathered whole now, and weights that
    ZeRO-3 keeps whole on every rank (below the persistence threshold)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    partitions = gathered = persistent = other = 0
    for p in model.parameters():
        if not hasattr(p, "ds_id"):
            other += p.numel() * p.element_size()
            continue
        partitions += p.ds_tensor.numel() * p.ds_tensor.element_size()
        if p.ds_persist:
            persistent += p.ds_numel * p.element_size()
        elif p.ds_status == ZeroParamStatus.AVAILABLE:
            gathered += p.ds_numel * p.element_size()
    return {"partitions_gb": partitions / GB, "gathered_gb": gathered / GB, "persistent_gb": persistent / GB,
            "unpartitioned_gb": other / GB}


class PeakGathered:
    """The most base weight gathered whole at once (GB), seen after every module's forward and backward."""

    def __init__(self, model) -> None:
        self.model, self.peak = model, 0.0
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_hook(self.look))
            self.handles.append(module.register_full_backward_hook(self.look))

    def look(self, *_args) -> None:
        self.peak = max(self.peak, zero_holdings(self.model)["gathered_gb"])


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed", default="ds_configs/zero3.json")
    p.add_argument("--model", default="large:llama")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quantization_bit", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="enable bf16 in the config (the base, and 4-bit storage)")
    p.add_argument("--gathered_limit", type=int, default=None,
                   help="set stage3_max_live_parameters and stage3_max_reuse_distance (e.g. DeepSpeed's 1e9)")
    p.add_argument("--method", default="adamix-lora")
    p.add_argument("--name", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def main() -> None:
    args = parse()
    distributed.init_process_group()
    phases = []

    def record(phase: str, model=None) -> None:
        now, peak = process_memory()
        phases.append({"phase": phase, "now_gb": now, "peak_gb": peak,
                       **(zero_holdings(model) if model is not None and hasattr(model, "parameters") else {})})

    record("started")
    train = TrainArguments(deepspeed=args.deepspeed, per_device_train_batch_size=args.micro, max_steps=args.steps)
    raw = load_ds_config(args.deepspeed)
    if args.bf16:
        raw["bf16"] = {"enabled": True}
    if args.gathered_limit is not None:
        raw["zero_optimization"].update(stage3_max_live_parameters=args.gathered_limit,
                                        stage3_max_reuse_distance=args.gathered_limit)
    ds_config, _ = resolve_ds_config(raw, train, distributed.world_size(), lambda plan: args.steps)
    model_args = ModelArguments(model_name_or_path=args.model, quantization_bit=args.quantization_bit)
    base = load_base(model_args, ds_config, vocab_size=args.vocab, seed=0)
    model = base.model
    record("base loaded and partitioned", model)
    mixtures = inject_mixtures(model, MixtureConfig(method=args.method), seed=0).to(base.device)
    optimizer = torch.optim.AdamW(mixtures.parameters(), lr=1e-4)
    record("mixtures attached", model)
    watch = PeakGathered(model)
    ids = torch.randint(4, args.vocab, (args.micro, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(base.device)
    model.train()
    for step in range(1, args.steps + 1):
        router = mixtures.router if mixtures.config.family == "adamix" else None
        if router is not None:
            router.step = step
        started = time.perf_counter()
        sums = causal_lm_losses(model, ids, ids, router=router, consistency=False)
        record(f"step {step} forward", model)
        sums.lm.backward()
        record(f"step {step} backward", model)
        distributed.all_reduce_gradients(list(mixtures.parameters()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record(f"step {step} done", model)
        phases[-1]["step_s"] = time.perf_counter() - started
    result = {"rank": distributed.rank(), "peak_gathered_gb": watch.peak, "phases": phases}
    everyone = distributed.all_gather_objects(result)
    if distributed.is_main():
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = {"config": args.deepspeed, "model": args.model, "vocab": args.vocab, "seq": args.seq,
               "micro": args.micro, "bf16": args.bf16, "quantization_bit": args.quantization_bit, "method": args.method,
               "zero_optimization": ds_config["zero_optimization"], "ranks": everyone}
        (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
        for phase in everyone[0]["phases"]:
            print(json.dumps(phase))
        print("peak gathered GB", [r["peak_gathered_gb"] for r in everyone])
    exit_process(0)


if __name__ == "__main__":
    main()
