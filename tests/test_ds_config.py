"""DeepSpeed config resolution: "auto" values, conflicts, batch arithmetic, optimizer and schedule."""

import json

import pytest
import torch

from adamix_ds.arguments import TrainArguments, parse_arguments
from adamix_ds.config import ConfigError
from adamix_ds.ds_config import load_ds_config, resolve_ds_config
from adamix_ds.optimization import build_optimizer, build_scheduler

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
    assert config["bf16"]["enabled"] is torch.cuda.is_available()
    assert "auto" not in json.dumps(config)


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


def test_run_file_with_command_line_override(tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"num_experts": 8, "lora_r": 2, "max_steps": 7}))
    model, data, mixture, train = parse_arguments(["--config", str(run_file), "--lora_r", "6"])
    assert (mixture.num_experts, mixture.lora_r, train.max_steps) == (8, 6, 7)
    run_file.write_text(json.dumps({"num_expert": 8}))
    with pytest.raises(ConfigError, match="unknown options \\['num_expert'\\]"):
        parse_arguments(["--config", str(run_file)])
