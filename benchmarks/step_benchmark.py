"""Step time, tokens/s and memory: Hugging Face PEFT LoRA in a standard DeepSpeed ZeRO-3 engine beside
adamix_ds's rows, in ONE run on the same machine, model, data and ZeRO-3 config; and the merge.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/step_benchmark.py            # CPU, 33M Llama
    deepspeed benchmarks/step_benchmark.py --model large:llama --seq 1024 --micro 8    # GPU, about 1B, bf16
    DS_ACCELERATOR=cpu deepspeed --num_gpus 1 benchmarks/step_benchmark.py --model smollm2:135m-instruct \
        --micro 8 --seq 96 --rows pabcd --deepspeed ds_configs/zero3.json             # the packaged SmolLM2

--model is a built-in config, a model directory, a GGUF file or the packaged SmolLM2. Rows (same targets q_proj,
v_proj, same rank):
  p  the plain loop a user writes instead of any trainer: the Hugging Face model, PEFT LoRA, torch AdamW, one
     process (1 rank only), bf16 by autocast where the run is bf16
  a  PEFT LoRA inside a standard DeepSpeed ZeRO-3 engine
  b  adamix_ds plain LoRA (M = 1)
  c  AdaMix-LoRA, M = 4
  d  AdaMix-LoRA, M = 4, consistency from one doubled-batch forward
  e  the same consistency loss the reference way: two separate forwards, KL on full logits
  f  AdaMix-adapter, M = 4
  g  moa-soft (LoRA q, k, v, o, down r 8, parallel adapter 16, prompt 10; linear router)
  h  moa-sparse with its threshold as initialised (nearly every expert active)
  i  moa-sparse with the threshold set so that about half the (token, expert) pairs are active
  j  moa-sparse with about a quarter active
Rows alternate (a b c ... a b c ...) so that drift on a shared machine hits all rows alike; the first
visit of every row is warm-up. Results go to benchmarks/results/<name>.json and .md (or --results_dir).
A row may change the micro-batch or the experts of the AdaMix rows: --rows b,d,b@micro=8,d@micro=8,c@experts=16.
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
from torch.nn import functional as F

from adamix_ds import MixtureConfig, causal_lm_losses, distributed
from adamix_ds.arguments import ModelArguments, TrainArguments
from adamix_ds.cli import exit_process
from adamix_ds.distributed.ds_config import load_ds_config, resolve_ds_config
from adamix_ds.distributed.sharded_base import load_base
from adamix_ds.export.merged_model import folded_deltas, write_merged_model
from adamix_ds.methods.adamix.merging import merge_experts
from adamix_ds.methods.registry import mixture_class
from adamix_ds.training.monitoring import peak_memory_gb, reset_peak_memory

ROWS = {
    "p": "plain loop: HF model + PEFT LoRA + torch AdamW, one process",
    "a": "PEFT LoRA in a DeepSpeed ZeRO-3 engine",
    "b": "adamix_ds LoRA (M=1)",
    "c": "AdaMix-LoRA M=4",
    "d": "AdaMix-LoRA M=4 + consistency (one doubled forward)",
    "e": "AdaMix-LoRA M=4 + consistency (two forwards, reference way)",
    "f": "AdaMix-adapter M=4",
    "g": "moa-soft",
    "h": "moa-sparse",
    "i": "moa-sparse",
    "j": "moa-sparse",
}
SPARSE_SHARE = {"i": 0.5, "j": 0.25}
"""Target share of active (token, expert) pairs of the rows with a set threshold."""


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medium:llama",
                   help="a built-in model (medium:llama, large:llama), a model directory, a GGUF file or "
                        "smollm2:135m-instruct")
    p.add_argument("--vocab", type=int, default=8192, help="a built-in model's vocabulary (others have their own)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4, help="visits of every row (the first is warm-up)")
    p.add_argument("--steps", type=int, default=3, help="steps per visit")
    p.add_argument("--rows", default="abcdefghij",
                   help="row letters (pabcdefghij), or comma-separated rows with settings: b,d@micro=8,c@experts=16")
    p.add_argument("--results_dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--deepspeed", default="ds_configs/zero3.json")
    p.add_argument("--name", default=None, help="results file name (default: derived from the device)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense peak TFLOP/s per rank for MFU (default: known GPUs, e.g. H100 989 bf16)")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def row_specs(text: str) -> list[tuple[str, str, dict]]:
    """(name, row letter, settings) of each row: 'abc' or 'b,d@micro=8,c@experts=16'."""
    items = text.split(",") if "," in text or "@" in text else list(text)
    specs = []
    for item in items:
        key, _, settings = item.partition("@")
        if key not in ROWS:
            raise SystemExit(f"--rows: unknown row {key!r} in {text!r}")
        values = dict(pair.split("=") for pair in settings.split(";") if pair)
        unknown = set(values) - {"micro", "experts"}
        if unknown:
            raise SystemExit(f"--rows: unknown settings {sorted(unknown)} in {item!r} (micro, experts)")
        if "experts" in values and key not in "cde":
            raise SystemExit(f"--rows: {item!r}: experts apply to the AdaMix-LoRA rows c, d and e")
        specs.append((item, key, {k: int(v) for k, v in values.items()}))
    return specs


def row_label(name: str) -> str:
    """The row's description with its settings: 'AdaMix-LoRA M=16', '... (micro-batch 8)'."""
    _, key, settings = row_specs(name)[0]
    label = ROWS[key]
    if "experts" in settings:
        label = label.replace("M=4", f"M={settings['experts']}")
    return label + (f" (micro-batch {settings['micro']})" if "micro" in settings else "")


class MixtureRow:
    """One adamix_ds row: its own mixtures and optimizer on the shared, sharded base."""

    def __init__(self, model, config: MixtureConfig, device, consistency: str | None) -> None:
        self.model, self.consistency = model, consistency
        torch.manual_seed(0)
        family = mixture_class(config)
        self.mixtures = family(config, family.locate(model, config)).to(device)
        self.params = list(self.mixtures.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.step_index = 0

    def enter(self) -> None:
        self.mixtures.attach(self.model)

    def leave(self) -> None:
        self.mixtures.detach()

    def step(self, ids: torch.Tensor) -> None:
        router = self.mixtures.router if self.mixtures.config.family == "adamix" else None
        if router is not None:
            router.step = self.step_index
        self.model.train()
        if self.consistency == "two_forwards":
            with router.use_passes(0):
                logits_1 = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            with router.use_passes(1):
                logits_2 = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            lp1, lp2 = F.log_softmax(logits_1, -1), F.log_softmax(logits_2, -1)
            kl = 0.5 * ((lp1.exp() * (lp1 - lp2.detach())).sum(-1) + (lp2.exp() * (lp2 - lp1.detach())).sum(-1))
            loss = F.nll_loss(lp1.flatten(0, 1), targets.flatten(), reduction="sum") + kl.sum()
            tokens = targets.numel()
        else:
            sums = causal_lm_losses(self.model, ids, ids, router=router, consistency=self.consistency == "one_forward")
            loss = sums.lm + (sums.kl if sums.kl is not None else 0.0)
            tokens = sums.tokens
        loss.backward()
        distributed.all_reduce_gradients(self.params)
        for p in self.params:
            p.grad.div_(tokens * distributed.world_size())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1


def whole_model(args, dtype: torch.dtype):
    """The benchmark's base, whole, as a user loads it: a built-in config drawn with seed 0, else from its files."""
    from transformers import AutoModelForCausalLM

    source = ModelArguments(model_name_or_path=args.model).source
    torch.manual_seed(0)
    if source.builtin:
        return AutoModelForCausalLM.from_config(source.config(vocab_size=args.vocab), dtype=dtype)
    return source.load(dtype)


def peft_lora(model):
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]))


class OwnModelRow:
    """A row on a model of its own: nothing to attach to the shared base or take off it between visits."""

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        pass


class PlainLoopRow(OwnModelRow):
    """The anchor: what a user writes instead of any trainer. The fp32 model with PEFT's LoRA under bf16 autocast
    where the run is bf16 (the usual mixed precision: fp32 weights and optimizer), stepped by torch's AdamW."""

    def __init__(self, args, bf16: bool, device) -> None:
        self.model = peft_lora(whole_model(args, torch.float32)).to(device)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.device_type, self.bf16 = device.type, bf16

    def step(self, ids: torch.Tensor) -> None:
        self.model.train()
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PeftRow(OwnModelRow):
    """PEFT's LoRA on its own base, in a standard DeepSpeed ZeRO-3 engine."""

    def __init__(self, args, ds_config: dict) -> None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self._keep = HfDeepSpeedConfig(ds_config)
        model = peft_lora(whole_model(args, torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32))
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler", "tensorboard")}
        # save_16bit_model under ZeRO-3 writes nothing unless the engine may gather the weights on save.
        engine_config["zero_optimization"] = {**engine_config["zero_optimization"],
                                              "stage3_gather_16bit_weights_on_model_save": True}
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-4),
                                               config=engine_config)

    def step(self, ids: torch.Tensor) -> None:
        self.engine.train()
        loss = self.engine(input_ids=ids, labels=ids, use_cache=False).loss
        self.engine.backward(loss)
        self.engine.step()


def set_active_share(row: "MixtureRow", share: float, args, device) -> None:
    """Make each layer's threshold a constant at the (1 - share) quantile of its gates on a random batch."""
    gates = {}
    handles = [layer_norm_hook(row.model, i, gates) for i in range(len(row.mixtures.layers))]
    ids = torch.randint(4, args.vocab, (args.micro, args.seq), generator=torch.Generator().manual_seed(99)).to(device)
    row.enter()
    with torch.no_grad():
        row.model.eval()(input_ids=ids, use_cache=False)
    row.leave()
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for i, layer in enumerate(row.mixtures.layers):
            scores = torch.sigmoid(layer.router.net(gates[i].to(layer.router.net.weight.dtype))).float()
            level = torch.quantile(scores.flatten()[:100_000], 1.0 - share).clamp(1e-4, 1 - 1e-4)
            level = distributed.all_reduce_sum(level.reshape(1).cpu()) / distributed.world_size()
            layer.router.threshold.weight.zero_()
            layer.router.threshold.bias.fill_(torch.logit(level / layer.router.max_threshold).item())


def layer_norm_hook(model, index: int, store: dict):
    def keep(module, args, out):
        store[index] = out.detach().reshape(-1, out.shape[-1])

    return model.model.layers[index].input_layernorm.register_forward_hook(keep)


def active_share(row) -> float | None:
    """Mean share of active (token, expert) pairs of a sparse row since its stats were last read."""
    stats = getattr(getattr(row, "mixtures", None), "stats", None)
    metrics = stats.metrics() if stats is not None else {}
    if "routers/active_experts" not in metrics:
        return None
    return metrics["routers/active_experts"] / row.mixtures.config.num_experts


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
"""Dense bf16 tensor-core peak per GPU (vendor data sheets, SXM parts)."""


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def model_flops_per_token(model, seq: int) -> float:
    """Forward plus the backward to the inputs of a frozen base: 4 N matmul FLOPs per token (no weight
    gradients), plus attention scores and values, 4 x layers x seq x width forward and twice that back."""
    from adamix_ds.distributed.sharded import full_numel

    config = model.config
    n = sum(full_numel(p) for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 4 * n + 12 * config.num_hidden_layers * seq * config.hidden_size


def summarise(times: list[float], tokens_per_step: int) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), statistics.median(times), max(times)]
    median = statistics.median(times)
    return {"median_s": median, "p25_s": q[0], "p75_s": q[-1], "steps": len(times),
            "tokens_per_s": tokens_per_step / median}


def main() -> None:
    args = parse()
    distributed.init_process_group()
    distributed.setup_rank_logging()
    world = distributed.world_size()
    ds_config, _ = resolve_ds_config(load_ds_config(args.deepspeed), TrainArguments(per_device_train_batch_size=args.micro),
                                     world, steps_for=lambda plan: 10_000)
    specs = row_specs(args.rows)
    if world > 1 and any(key == "p" for _, key, _ in specs):
        raise SystemExit("--rows: row p is the single-process loop; run it with 1 rank (--num_gpus 1)")
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(distributed.local_rank()))
    # Before the sharded base: its ZeRO-3 config would make transformers create this model partitioned.
    plain = {name: PlainLoopRow(args, ds_config["bf16"]["enabled"], device) for name, key, _ in specs if key == "p"}
    base = load_base(ModelArguments(model_name_or_path=args.model), ds_config, vocab_size=args.vocab, seed=0)
    args.vocab = base.model.config.vocab_size
    rows, micro = {}, {}
    for name, key, settings in specs:
        micro[name] = settings.get("micro", args.micro)
        if key == "p":
            rows[name] = plain[name]
        elif key == "a":
            rows[name] = PeftRow(args, ds_config)
        elif key in "bcde":
            m = 1 if key == "b" else settings.get("experts", 4)
            method = "lora" if key == "b" else "adamix-lora"
            consistency = {"d": "one_forward", "e": "two_forwards"}.get(key)
            rows[name] = MixtureRow(base.model, MixtureConfig(method=method, num_experts=m,
                                                              share="none" if m > 1 else "up", lora_r=4, lora_alpha=32),
                                    device, consistency)
        elif key == "f":
            rows[name] = MixtureRow(base.model, MixtureConfig(method="adamix-adapter", num_experts=4, share="none"),
                                    device, None)
        elif key == "g":
            rows[name] = MixtureRow(base.model, MixtureConfig(method="moa-soft"), device, None)
        elif key == "h":
            rows[name] = MixtureRow(base.model, MixtureConfig(method="moa-sparse"), device, None)
        else:
            rows[name] = MixtureRow(base.model, MixtureConfig(method="moa-sparse", max_threshold=1.0), device, None)
            set_active_share(rows[name], SPARSE_SHARE[key], args, device)
    generator = torch.Generator().manual_seed(distributed.rank())
    times: dict[str, list[float]] = {key: [] for key in rows}
    memory: dict[str, float] = {}
    per_row_memory = True
    for visit in range(args.rounds):
        for key, row in rows.items():
            row.enter()
            per_row_memory = reset_peak_memory() and per_row_memory
            for _ in range(args.steps):
                ids = torch.randint(4, args.vocab, (micro[key], args.seq), generator=generator).to(device)
                distributed.barrier()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                row.step(ids)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                distributed.barrier()
                if visit > 0:
                    times[key].append(time.perf_counter() - start)
            memory[key] = max(memory.get(key, 0.0), peak_memory_gb())
            row.leave()
    results = {name: {"row": row_label(name), "micro": micro[name],
                      **summarise(times[name], micro[name] * args.seq * world), "peak_memory_gb": memory[name]}
               for name in rows}
    peak = peak_tflops(args)
    if peak:
        flops = model_flops_per_token(base.model, args.seq)
        for r in results.values():
            r["mfu"] = r["tokens_per_s"] / world * flops / (peak * 1e12)
    for key, row in rows.items():
        share = active_share(row)
        if share is not None:
            results[key]["active_share"] = share
            results[key]["row"] = f"{row_label(key)} ({100 * share:.0f}% of (token, expert) pairs active)"
    merge = measure_merge(base, rows, args)
    if distributed.is_main():
        write_results(args, results, merge, ds_config, world, per_row_memory)
    distributed.destroy_process_group()


def measure_merge(base, rows, args) -> dict:
    """Seconds to average the experts and write the shard-aware merged model, beside DeepSpeed's
    save_16bit_model of the PEFT engine's (same-size) model."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "c" in rows:
            distributed.barrier()
            start = time.perf_counter()
            merged = merge_experts(rows["c"].mixtures)
            write_merged_model(base.model, folded_deltas(merged), Path(tmp) / "ours")
            out["adamix_ds merge_experts + shard-aware write_merged_model"] = time.perf_counter() - start
        if "a" in rows:
            distributed.barrier()
            start = time.perf_counter()
            saved = rows["a"].engine.save_16bit_model(str(Path(tmp) / "deepspeed"))
            distributed.barrier()
            if not saved:
                raise RuntimeError("DeepSpeed's save_16bit_model wrote nothing")
            out["DeepSpeed save_16bit_model (PEFT engine)"] = time.perf_counter() - start
    return out


def memory_header(per_row: bool) -> str:
    if torch.cuda.is_available():
        return "peak GPU memory per rank (GB)"
    return "peak RSS per rank (GB)" if per_row else "process peak RSS so far (GB)"


def write_results(args, results: dict, merge: dict, ds_config: dict, world: int, per_row_memory: bool) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})"
    name = args.name or ("gpu" if torch.cuda.is_available() else "cpu")
    base_row, plain = results.get("b"), results.get("p")
    with_mfu = all("mfu" in r for r in results.values())
    lines = [f"Measured on {device}, {world} ranks, ZeRO stage {ds_config['zero_optimization']['stage']}, "
             f"{args.model} (vocab {args.vocab}), {torch.get_num_threads()} threads per rank, micro-batch "
             f"{args.micro} x {args.seq} tokens per rank, bf16 {ds_config['bf16']['enabled']}; median of "
             f"{(args.rounds - 1) * args.steps} steps per row after warm-up, rows interleaved.", "",
             f"| row | median step (s) | p25-p75 (s) | tokens/s | {memory_header(per_row_memory)} | vs (b) |"
             + (" vs (p) |" if plain else "") + (" MFU |" if with_mfu else ""),
             "|---|---|---|---|---|---|" + ("---|" if plain else "") + ("---|" if with_mfu else "")]
    for key, r in results.items():
        ratios = [f" {r['median_s'] / anchor['median_s']:.2f} |" if anchor else " - |"
                  for anchor in [base_row] + ([plain] if plain else [])]
        lines.append(f"| ({key}) {r['row']} | {r['median_s']:.3f} | {r['p25_s']:.3f}-{r['p75_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['peak_memory_gb']:.2f} |" + "".join(ratios)
                     + (f" {100 * r['mfu']:.1f}% |" if with_mfu else ""))
    if merge:
        lines += ["", "| merge | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in merge.items()]
    directory = args.results_dir
    directory.mkdir(parents=True, exist_ok=True)
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    record = {"device": device, "world_size": world, "args": arguments, "rows": results, "merge": merge,
              "memory": memory_header(per_row_memory)}
    (directory / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (directory / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
    exit_process(0)
