"""DeepSpeed config resolution: "auto" values, conflicts, batch arithmetic, optimizer and schedule."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from adamix_ds.arguments import TrainArguments, parse_arguments
from adamix_ds.config import ConfigError
from adamix_ds.distributed import ds_config
from adamix_ds.distributed.ds_config import LAYER_SIZED, load_ds_config, resolve_ds_config
from adamix_ds.training.optimization import build_optimizer, build_scheduler

SHIPPED = load_ds_config("ds_configs/zero3.json")


def test_auto_values_resolve_from_arguments():
    args = TrainArguments(per_device_train_batch_size=3, gradient_accumulation_steps=2, learning_rate=1e-3,
                          max_grad_norm=0.5, warmup_steps=4)
    config, plan = resolve_ds_config(SHIPPED, args, world_size=2, steps_for=lambda p: 100)
    assert (plan.micro_batch, plan.accumulation, plan.global_batch) == (3, 2, 12)
    assert config["train_batch_size"] == 12 and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    sched = config["scheduler"]["params"]
    assert (sched["warmup_max_lr"], sched["warmup_num_steps"], sched["total_num_steps"]) == (1e-3, 4, 100)
    assert config["bf16"]["enabled"] is False  # "auto" under the suite's ADAMIX_DS_AUTO_BF16=0 (tests/conftest.py)
    sized = {key: config["zero_optimization"].pop(key) for key in LAYER_SIZED}
    assert sized == dict.fromkeys(LAYER_SIZED, "auto")  # load_base resolves them from the model
    assert "auto" not in json.dumps(config)


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's choice; a CUDA device decides by itself")
@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="the kernel's CPU flags are read from /proc/cpuinfo")
def test_bf16_auto_follows_the_cpus_bf16_hardware_and_says_why(monkeypatch, caplog):
    """"auto" is bf16 exactly where the kernel lists AMX or AVX512-BF16 (read here from /proc/cpuinfo, independently
    of torch's checks); the log names the choice and its reason; the variable overrides it either way."""
    flags = _cpu_flags()
    expected = [name for name, flag in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16")) if flag in flags]
    assert ds_config.cpu_bf16_units() == expected
    monkeypatch.delenv(ds_config.AUTO_BF16_VARIABLE)
    monkeypatch.setattr(ds_config, "_SAID", set())
    for units, enabled, reason in ((["AMX"], True, "bf16 base: this CPU computes bf16 in hardware (AMX)"),
                                   ([], False, "fp32: this CPU has no bf16 hardware")):
        monkeypatch.setattr(ds_config, "cpu_bf16_units", lambda units=units: units)
        with caplog.at_level("INFO", logger=ds_config.__name__):
            caplog.clear()
            config, _ = resolve_ds_config(SHIPPED, TrainArguments(), world_size=1, steps_for=lambda p: 10)
        assert config["bf16"]["enabled"] is enabled
        assert f'precision: bf16 "auto" -> {reason}' in caplog.text
    for value, enabled in (("1", True), ("0", False)):
        monkeypatch.setenv(ds_config.AUTO_BF16_VARIABLE, value)
        config, _ = resolve_ds_config(SHIPPED, TrainArguments(), world_size=1, steps_for=lambda p: 10)
        assert config["bf16"]["enabled"] is enabled
    explicit = {**SHIPPED, "bf16": {"enabled": False}}  # an explicit value is never overridden
    assert resolve_ds_config(explicit, TrainArguments(), world_size=1, steps_for=lambda p: 10)[0]["bf16"]["enabled"] is False
    monkeypatch.setenv(ds_config.AUTO_BF16_VARIABLE, "yes")
    with pytest.raises(ConfigError, match="ADAMIX_DS_AUTO_BF16='yes': use 0 \\(fp32\\) or 1 \\(bf16\\)"):
        resolve_ds_config(SHIPPED, TrainArguments(), world_size=1, steps_for=lambda p: 10)


def test_explicit_config_values_are_used_and_conflicts_refused():
    raw = {**SHIPPED, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 2.0}
    config, plan = resolve_ds_config(raw, TrainArguments(), world_size=1, steps_for=lambda p: 10)
    assert plan.micro_batch == 8 and config["gradient_clipping"] == 2.0
    with pytest.raises(ConfigError, match="--per_device_train_batch_size=4 contradicts the DeepSpeed config's "
                                          "train_micro_batch_size_per_gpu=8"):
        resolve_ds_config(raw, TrainArguments(per_device_train_batch_size=4), world_size=1, steps_for=lambda p: 10)


def test_batch_arithmetic_must_add_up():
    raw = {**SHIPPED, "train_batch_size": 10}
    with pytest.raises(ConfigError, match=r"train_batch_size=10 but micro-batch 4 x accumulation 1 x 2 ranks = 8"):
        resolve_ds_config(raw, TrainArguments(), world_size=2, steps_for=lambda p: 10)


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type='Lamb'"),
        ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type='OneCycle'"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
    ],
)
def test_unsupported_sections_are_refused(patch, message):
    with pytest.raises(ConfigError, match=message):
        resolve_ds_config({**SHIPPED, **patch}, TrainArguments(), world_size=1, steps_for=lambda p: 10)


def test_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 4,}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_ds_config(tmp_path / "missing.json")


def test_optimizer_and_schedule_follow_the_sections():
    config, _ = resolve_ds_config(SHIPPED, TrainArguments(learning_rate=0.1, warmup_steps=2, weight_decay=0.01),
                                  world_size=1, steps_for=lambda p: 6)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer([param], config["optimizer"])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
    scheduler = build_scheduler(optimizer, config["scheduler"])
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # DeepSpeed's WarmupDecayLR, linear: 0 -> 0.1 over 2 steps, then linear decay to 0 at step 6.
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.075, 0.05, 0.025])


def _lrs(config, steps):
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = build_optimizer([param], config["optimizer"])
    scheduler = build_scheduler(optimizer, config["scheduler"])
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_lr_scheduler_type_picks_the_schedule_of_an_auto_config():
    args = dict(learning_rate=0.1, warmup_steps=2)
    shipped_and_auto_ratio = json.loads(json.dumps(SHIPPED))
    shipped_and_auto_ratio["scheduler"]["params"]["cos_min_ratio"] = "auto"  # nothing sets it: DeepSpeed's default
    cosine, _ = resolve_ds_config(shipped_and_auto_ratio, TrainArguments(lr_scheduler_type="cosine", **args),
                                  world_size=1, steps_for=lambda p: 6)
    assert cosine["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 2, "total_num_steps": 6, "warmup_type": "linear"}}
    # By hand: linear warm-up 0 -> peak over 2 steps, then peak * (r + (1 - r) (1 + cos(pi k / 4)) / 2) for
    # k = 1..4 post-warm-up steps, r = 1e-4 (DeepSpeed's cos_min_ratio).
    r = 1e-4
    cosine_part = [0.1 * (r + (1 - r) * (1 + math.cos(math.pi * k / 4)) / 2) for k in (1, 2, 3, 4)]
    assert _lrs(cosine, 6) == pytest.approx([0.0, 0.05] + cosine_part)
    constant, _ = resolve_ds_config(SHIPPED, TrainArguments(lr_scheduler_type="constant_with_warmup", **args),
                                    world_size=1, steps_for=lambda p: 6)
    assert constant["scheduler"]["type"] == "WarmupLR" and "total_num_steps" not in constant["scheduler"]["params"]
    assert _lrs(constant, 5) == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1])
    linear, _ = resolve_ds_config(SHIPPED, TrainArguments(**args), world_size=1, steps_for=lambda p: 6)
    assert linear["scheduler"]["type"] == "WarmupDecayLR"  # "auto" without the option: linear
    no_section = {k: v for k, v in SHIPPED.items() if k != "scheduler"}
    assert resolve_ds_config(no_section, TrainArguments(), world_size=1)[0].get("scheduler") is None
    added, _ = resolve_ds_config(no_section, TrainArguments(lr_scheduler_type="cosine"), world_size=1,
                                 steps_for=lambda p: 6)
    assert added["scheduler"]["type"] == "WarmupCosineLR"


@pytest.mark.parametrize("scheduler, option, message", [
    ({"type": "WarmupDecayLR", "params": {}}, "cosine",
     "--lr_scheduler_type=cosine asks for DeepSpeed's WarmupCosineLR but the config's scheduler.type is "
     "'WarmupDecayLR'"),
    ({"type": "auto", "params": {}}, "polynomial", "--lr_scheduler_type='polynomial' is not allowed: one of linear, "
                                                   "cosine, constant_with_warmup"),
    ({"type": "auto", "params": {"warmup_max_lr": 0.5}}, "cosine",
     "scheduler.params.warmup_max_lr=0.5 does not apply to WarmupCosineLR"),
])
def test_schedule_conflicts_are_refused(scheduler, option, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_ds_config({**SHIPPED, "scheduler": scheduler}, TrainArguments(lr_scheduler_type=option),
                          world_size=1, steps_for=lambda p: 6)


def test_run_file_with_command_line_override(tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"num_experts": 8, "lora_r": 2, "max_steps": 7}))
    model, data, mixture, train = parse_arguments(["--config", str(run_file), "--lora_r", "6"])
    assert (mixture.num_experts, mixture.lora_r, train.max_steps) == (8, 6, 7)
    run_file.write_text(json.dumps({"num_expert": 8}))
    with pytest.raises(ConfigError, match="unknown options \\['num_expert'\\]"):
        parse_arguments(["--config", str(run_file)])


def test_yaml_run_file_with_command_line_override(tmp_path):
    """The same options as a YAML run file (LLaMA-Factory's and axolotl's format); the command line still wins."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text("# an AdaMix run\nnum_experts: 8\nlora_r: 2\nmax_steps: 7\nlearning_rate: 2e-4\n"
                        "target_modules: q_proj,v_proj\nmerge_at_end: false\n")
    model, data, mixture, train = parse_arguments(["--config", str(run_file), "--lora_r", "6"])
    assert (mixture.num_experts, mixture.lora_r, train.max_steps) == (8, 6, 7)
    assert (train.learning_rate, mixture.target_modules, train.merge_at_end) == (2e-4, "q_proj,v_proj", False)
    run_file.write_text("- num_experts\n- 8\n")
    with pytest.raises(ConfigError, match="holds option names and values, not list"):
        parse_arguments(["--config", str(run_file)])
    run_file.write_text("num_experts: [8\n")
    with pytest.raises(ConfigError, match=f"--config {run_file}"):
        parse_arguments(["--config", str(run_file)])


def test_gathered_working_set_is_two_decoder_layers_capped_at_deepspeeds_default():
    from adamix_ds.arguments import ModelArguments
    from adamix_ds.distributed.ds_config import resolve_layer_sized
    from adamix_ds.distributed.sharded_base import decoder_layer_numel

    config, _ = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), TrainArguments(), 2, lambda plan: 10)
    zero = config["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == "auto"
    # tiny:llama's layer by hand: q, o 32x32; k, v 32x16 (2 of 4 heads of 8); gate, up, down 32x64; two norms of 32
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    assert decoder_layer_numel(ModelArguments(model_name_or_path="tiny:llama"), vocab_size=128) == layer
    resolve_layer_sized(config, layer)
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 2 * layer
    big = {"zero_optimization": {"stage3_max_live_parameters": "auto", "stage3_max_reuse_distance": 5}}
    resolve_layer_sized(big, 860_000_000)  # a 70B layer
    assert big["zero_optimization"] == {"stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 5}


def test_freed_host_buffers_go_back_to_the_system(tmp_path):
    """glibc's default: a freed 16 MB block raises the mmap threshold, the next 16 MB block comes from the heap
    and stays resident after it is freed (a small block after it pins the heap). With return_freed_memory() it
    is unmapped."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        "from adamix_ds.distributed.host_memory import return_freed_memory\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024\n"
        "if sys.argv[1] == 'fixed':\n"
        "    assert return_freed_memory()\n"
        "a = torch.ones(4 * 1024 * 1024)\n"
        "del a\n"
        "before = rss()\n"
        "b = torch.ones(4 * 1024 * 1024)\n"
        "c = torch.ones(1000)\n"
        "del b\n"
        "print(rss() - before)\n")
    kept = {mode: float(subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                                       check=True, timeout=120).stdout.split()[-1]) for mode in ("glibc", "fixed")}
    assert kept["glibc"] > 12 and kept["fixed"] < 2, kept


def test_an_unknown_option_is_one_line_naming_the_closest(tmp_path):
    """A mistyped option stops with one line (HfArgumentParser's own error is a traceback on every rank)."""
    with pytest.raises(ConfigError, match=re.escape("unknown arguments ['--max_eval_examples', '40']; did you mean "
                                                    "--max_eval_samples?")):
        parse_arguments(["--data_path", "x.jsonl", "--max_eval_examples", "40"])
    with pytest.raises(ConfigError, match="`--help` lists every option"):
        parse_arguments(["--data_path", "x.jsonl", "--zzz"])
