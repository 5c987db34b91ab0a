"""The GPU check: bf16 correctness, speed and the merge on one GPU, within a hard budget of 8 minutes.

    python benchmarks/gpu_wheels.py                        # once, where pip can download: the wheels it lacks
    python benchmarks/gpu_check.py --out gpu-check         # on the GPU node (docs/gpu-check.md)
    python benchmarks/gpu_check.py --out /tmp/check --cpu  # fast CPU mode: tiny models, seconds (the tests run it)

Installs what the GPU machine lacks from .gpu_wheels/ offline and the project without its dependencies, then
runs each part in its own process under its own timeout, so that a failing part still leaves the others'
results: OUT/<part>.json and OUT/<part>.log, and OUT/summary.json and OUT/summary.md at the end.

Parts: correctness (bf16 mixtures against fp32, merge and PEFT round trip, attention kernels, a 1-rank ZeRO-3
run that lowers the loss, resumes exactly and exports), benchmark (rows a-e, g, h of step_benchmark.py on
large:llama at sequence length 1024, with MFU and the (d)/(b), (d)/(e) ratios), micro_batch (rows b and d at
micro-batches 4, 8, 16), experts (row c with M = 1, 4, 16, 64) and real_model (the plain HF + PEFT loop, rows p, b, c,
d, on 135m:llama: SmolLM2-135M's shape and vocabulary, since the packaged model is too large to carry).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".gpu_wheels"
BUDGET_S = 480
PARTS = {"correctness": 150, "benchmark": 120, "micro_batch": 70, "experts": 70, "real_model": 70}
"""Seconds each part may take on the GPU; together the budget, with the install before them."""
TOLERANCE = {"logits": 0.05, "gradient_cosine": 0.99, "resume": 1e-5}
"""bf16 against fp32: relative L2 error of logits, cosine of mixture gradients; losses of a resumed run."""


def settings(cpu: bool) -> dict:
    if cpu:
        return dict(model="tiny:llama", vocab=128, seq=32, micro=(1, 2, 4), experts=(1, 2, 4, 8), rounds=2, steps=1,
                    train_model="tiny:llama", dtype="float32")
    return dict(model="large:llama", vocab=32000, seq=1024, micro=(4, 8, 16), experts=(1, 4, 16, 64), rounds=3,
                steps=3, train_model="small:llama", dtype="bfloat16")


# The parts. Each runs in its own process: python gpu_check.py --part NAME --out OUT [--cpu].
def part_correctness(out: Path, cpu: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from adamix_ds import MixtureConfig, export_peft_adapter, inject_mixtures, merge_experts
    from adamix_ds.builtin_models import builtin_config

    s = settings(cpu)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    low = torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "checks": {}}

    def model(dtype, attention="sdpa"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(builtin_config(s["train_model"], 512), dtype=dtype,
                                             attn_implementation=attention)
        return m.to(device).requires_grad_(False)

    def relative(a, b) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def randomized(base, method: str):
        """The method's fp32 mixtures on `base`, every weight drawn (B starts at zero, which would hide them)."""
        mixtures = inject_mixtures(base, MixtureConfig(method=method), seed=5).to(device)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in mixtures.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        return mixtures

    ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    for method in ("adamix-lora", "adamix-adapter", "molora", "moa-soft"):
        runs = {}
        for dtype in (torch.float32, low):
            base = model(dtype)
            mixtures = randomized(base, method)
            base.train()
            if mixtures.config.family == "adamix":
                mixtures.router.step = 7
            logits = base(input_ids=ids).logits
            logits.float().logsumexp(-1).mean().backward()
            runs[dtype] = (logits.detach(), [p.grad.detach().flatten() for p in mixtures.parameters()
                                             if p.grad is not None])
        (l32, g32), (l16, g16) = runs[torch.float32], runs[low]
        cosine = min(float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))
                     for a, b in zip(g16, g32) if b.norm() > 0)
        error = relative(l16, l32)
        results["checks"][f"bf16 {method}"] = {"logits_relative_error": error, "gradient_cosine": cosine,
                                              "ok": error < TOLERANCE["logits"] and cosine > TOLERANCE["gradient_cosine"]}

    import peft

    base = model(low)
    mixtures = randomized(base, "adamix-lora")
    base.eval()
    with torch.no_grad():
        merged = base(input_ids=ids).logits
    export_peft_adapter(merge_experts(mixtures), out / "peft-adapter")
    served = peft.PeftModel.from_pretrained(model(low), str(out / "peft-adapter")).to(device).eval()
    with torch.no_grad():
        error = relative(served(input_ids=ids).logits, merged)
    results["checks"]["merge and PEFT round trip (bf16)"] = {"logits_relative_error": error,
                                                             "ok": error < TOLERANCE["logits"]}

    kernels = ["eager", "sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and device == "cuda"
                                   else [])
    with torch.no_grad():
        reference = model(low, "eager")(input_ids=ids).logits
        for kernel in kernels[1:]:
            error = relative(model(low, kernel)(input_ids=ids).logits, reference)
            results["checks"][f"attention {kernel} vs eager (bf16)"] = {"logits_relative_error": error,
                                                                       "ok": error < TOLERANCE["logits"]}
    results["checks"]["train, resume, export"] = train_resume_export(out, s, cpu)
    results["ok"] = all(c["ok"] for c in results["checks"].values())
    return results


def train_resume_export(out: Path, s: dict, cpu: bool) -> dict:
    """A 1-rank ZeRO-3 adamix-lora run through the real launcher: eval loss falls, a run resumed from its step-4
    checkpoint takes the same losses, and the merged model loads."""
    args = ["--model_name_or_path", s["train_model"], "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4",
            "--logging_steps", "1", "--num_samples", "1", "--sample_max_new_tokens", "8", "--max_seq_length", "96",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "100", "--eval_modes", "merged",
            "--learning_rate", "2e-3", "--warmup_steps", "1", "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    full, resumed = out / "train" / "full", out / "train" / "resumed"

    def launch(extra: list[str], log: Path) -> None:
        command = [*_launcher(cpu), str(REPO / "launch" / "train.py"), *args, *extra]
        with open(log, "w") as handle:
            subprocess.run(command, cwd=REPO, env=_env(cpu), stdout=handle, stderr=subprocess.STDOUT, check=True)

    full.mkdir(parents=True, exist_ok=True)
    launch(["--output_dir", str(full)], out / "train-full.log")
    launch(["--output_dir", str(resumed), "--resume_from_checkpoint", str(full / "checkpoints" / "step-4")],
           out / "train-resumed.log")
    a, b = (json.loads((d / "run.json").read_text()) for d in (full, resumed))
    losses = lambda record: {h["step"]: h["train/loss"] for h in record["history"] if "train/loss" in h}  # noqa: E731
    evals = [h["eval/merged/loss"] for h in a["history"] if "eval/merged/loss" in h]
    difference = max(abs(losses(a)[step] - losses(b)[step]) for step in range(5, 9))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(full / "merged" / "model")
    return {"eval_loss": evals, "resumed_max_loss_difference": difference,
            "bf16": a["deepspeed_config"]["bf16"]["enabled"],
            "ok": evals[-1] < evals[0] and difference <= TOLERANCE["resume"]}


def _benchmark(out: Path, cpu: bool, name: str, rows: str, **shape) -> dict:
    s = {**settings(cpu), **shape}
    command = [*_launcher(cpu), str(REPO / "benchmarks" / "step_benchmark.py"), "--model", s["model"], "--vocab", str(s["vocab"]),
               "--seq", str(s["seq"]), "--micro", str(s["micro"][0]), "--rows", rows, "--rounds", str(s["rounds"]),
               "--steps", str(s["steps"]), "--results_dir", str(out), "--name", f"{name}-rows"]
    with open(out / f"{name}-rows.log", "w") as handle:
        subprocess.run(command, cwd=REPO, env=_env(cpu), stdout=handle, stderr=subprocess.STDOUT, check=True)
    return json.loads((out / f"{name}-rows.json").read_text())


def _ratio(rows: dict, over: str, under: str) -> float:
    return rows[over]["median_s"] / rows[under]["median_s"]


def part_benchmark(out: Path, cpu: bool) -> dict:
    record = _benchmark(out, cpu, "benchmark", "abcdegh")
    rows = record["rows"]
    return {"rows": rows, "merge": record["merge"], "d_over_b": _ratio(rows, "d", "b"),
            "d_over_e": _ratio(rows, "d", "e"), "ok": True}


def part_real_model(out: Path, cpu: bool) -> dict:
    s = settings(cpu)
    shape = {"model": s["model"], "vocab": s["vocab"]} if cpu else {"model": "135m:llama", "vocab": 49152}
    rows = _benchmark(out, cpu, "real_model", "pbcd", **shape)["rows"]
    return {"rows": rows, "b_over_p": _ratio(rows, "b", "p"), "c_over_b": _ratio(rows, "c", "b"),
            "d_over_b": _ratio(rows, "d", "b"), "ok": True}


def part_micro_batch(out: Path, cpu: bool) -> dict:
    sizes = settings(cpu)["micro"]
    names = [f"{row}@micro={m}" for m in sizes for row in "bd"]
    rows = _benchmark(out, cpu, "micro_batch", ",".join(names))["rows"]
    return {"rows": rows, "d_over_b": {m: _ratio(rows, f"d@micro={m}", f"b@micro={m}") for m in sizes}, "ok": True}


def part_experts(out: Path, cpu: bool) -> dict:
    counts = settings(cpu)["experts"]
    rows = _benchmark(out, cpu, "experts", ",".join(f"c@experts={m}" for m in counts))["rows"]
    return {"rows": rows, "ok": True}


# The driver.
def _launcher(cpu: bool) -> list[str]:
    """DeepSpeed's launcher on one GPU (NCCL); in CPU mode one plain process, the same code as a world of one."""
    if cpu:
        return [sys.executable]
    from adamix_ds.distributed.collectives import free_port

    return ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port())]


def _env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def install(out: Path) -> list[str]:
    """The wheels the machine lacks (from .gpu_wheels/, offline) and the project without its dependencies, into
    OUT/site, which PYTHONPATH then names. Nothing is installed where everything imports already."""
    site, done = out / "site", []
    missing = [m for m in ("deepspeed", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"{', '.join(missing)} missing and no wheels in {WHEELS}: run benchmarks/gpu_wheels.py")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(site),
                        *wheels], check=True)
        done += [Path(w).name for w in wheels]
    if importlib.util.find_spec("adamix_ds") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(REPO)], check=True)
        done.append("adamix_ds")
    if done:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
        os.environ["PATH"] = os.pathsep.join([str(site / "bin"), os.environ["PATH"]])
    return done


def run_parts(out: Path, cpu: bool, parts: list[str]) -> dict:
    started = time.perf_counter()
    summary: dict = {"cpu_mode": cpu, "installed": install(out), "parts": {}}
    for part in parts:
        left = BUDGET_S - (time.perf_counter() - started)
        limit = min(PARTS[part], left)
        if limit <= 5:
            summary["parts"][part] = {"status": "skipped: the budget is spent"}
            continue
        log = out / f"{part}.log"
        begun = time.perf_counter()
        with open(log, "w") as handle:  # a session of its own: a timeout ends the launcher and ranks it started
            process = subprocess.Popen([sys.executable, __file__, "--part", part, "--out", str(out)]
                                       + (["--cpu"] if cpu else []), env=_env(cpu), stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=limit)
                status = "ok" if code == 0 else f"failed (exit {code}; see {log.name})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        result_file = out / f"{part}.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if status == "ok" and not result.get("ok", False):
            status = "failed a check"
        summary["parts"][part] = {"status": status, "seconds": time.perf_counter() - begun}
    summary["seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(out, summary))
    return summary


def markdown(out: Path, summary: dict) -> str:
    lines = [f"GPU check ({'CPU mode' if summary['cpu_mode'] else 'GPU'}), {summary['seconds']:.0f} s.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p} | {r['status']} | {r.get('seconds', 0):.0f} |" for p, r in summary["parts"].items()]
    correctness = out / "correctness.json"
    if correctness.is_file():
        lines += ["", "| check | result | ok |", "|---|---|---|"]
        for name, check in json.loads(correctness.read_text())["checks"].items():
            shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()
                              if k != "ok")
            lines.append(f"| {name} | {shown} | {check['ok']} |")
    for part in ("benchmark", "micro_batch", "experts", "real_model"):
        path = out / f"{part}-rows.md"
        if path.is_file():
            lines += ["", f"**{part}**", "", path.read_text().strip()]
    benchmark = out / "benchmark.json"
    if benchmark.is_file():
        b = json.loads(benchmark.read_text())
        lines += ["", f"(d)/(b) {b['d_over_b']:.2f}, (d)/(e) {b['d_over_e']:.2f}."]
    micro = out / "micro_batch.json"
    if micro.is_file():
        ratios = json.loads(micro.read_text())["d_over_b"]
        lines += ["", "(d)/(b) by micro-batch: " + ", ".join(f"{m}: {r:.2f}" for m, r in ratios.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Where every result is written.")
    parser.add_argument("--cpu", action="store_true", help="Fast CPU mode: tiny models, seconds.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated from {', '.join(PARTS)}.")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        result = globals()[f"part_{args.part}"](args.out, args.cpu)
        (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0 if result.get("ok") else 1
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}")
    summary = run_parts(args.out, args.cpu, parts)
    print((args.out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in summary["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
