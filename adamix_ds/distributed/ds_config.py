"""Resolve a DeepSpeed JSON config for this trainer, the way the Hugging Face Trainer fills "auto" values.

DeepSpeed itself leaves "auto" to the Hugging Face Trainer; with a trainer of our own, every "auto"
is replaced here from the command-line arguments (or a default), and a value set explicitly in both
places that disagrees is refused with both values named.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..arguments import TrainArguments
from ..config import ConfigError

logger = logging.getLogger(__name__)
_SAID: set[str] = set()
AUTO = "auto"
DEFAULTS = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "warmup_steps": 0,
}
LAYER_SIZED = ("stage3_max_live_parameters", "stage3_max_reuse_distance")
"""ZeRO-3 sizes whose "auto" depends on the model: load_base resolves them once it knows the decoder layer's size
(resolve_layer_sized)."""
MAX_GATHERED = 10**9
"""DeepSpeed's default for both, the cap of "auto"."""
OPTIMIZERS = ("AdamW", "Adam", "SGD")
SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
SCHEDULER_OF_TYPE = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR", "constant_with_warmup": "WarmupLR"}
"""--lr_scheduler_type (Hugging Face's names) -> the DeepSpeed schedule of that shape (DeepSpeed's own step
conventions: its cosine starts decaying on the first step after the warm-up)."""


@dataclass(frozen=True)
class BatchPlan:
    """The batch arithmetic of one optimizer step."""

    micro_batch: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    def describe(self, seq_len: int) -> str:
        return (
            f"batch: {self.micro_batch} per micro-batch x {self.accumulation} accumulation x {self.world_size} "
            f"ranks = {self.global_batch} sequences per step (up to {self.global_batch * seq_len:,} tokens)"
        )


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({error})") from error


def _merge(config: dict, key: str, arg_name: str, arg_value, default=None, where: str = ""):
    """The value for config[key]: from the config, the argument, or the default; conflicts are errors."""
    value = config.get(key, AUTO)
    if value == AUTO:
        resolved = arg_value if arg_value is not None else (default if default is not None else DEFAULTS[arg_name])
    elif arg_value is not None and arg_value != value:
        raise ConfigError(
            f"--{arg_name}={arg_value} contradicts the DeepSpeed config's {where}{key}={value}; "
            f"set one of them, or make the config value \"auto\""
        )
    else:
        resolved = value
    config[key] = resolved
    return resolved


AUTO_BF16_VARIABLE = "ADAMIX_DS_AUTO_BF16"
"""Set to 0 or 1 to decide what bf16 "auto" means on this machine (0 keeps fp32, e.g. for exact fp32 references)."""


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 matrix units that torch uses (oneDNN): AMX tiles, AVX512-BF16."""
    checks = {"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"}
    return [name for name, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


def auto_bf16() -> tuple[bool, str]:
    """What bf16 "auto" becomes here, and why: on where bf16 is fast, a CUDA device with bf16 or a CPU that computes
    bf16 in hardware. On a 2-core AMX CPU a SmolLM2-135M LoRA step took 0.60 of its fp32 time (docs/benchmarks.md)."""
    chosen = os.environ.get(AUTO_BF16_VARIABLE, "")
    if chosen in ("0", "1"):
        return chosen == "1", f"{AUTO_BF16_VARIABLE}={chosen}"
    if chosen:
        raise ConfigError(f"{AUTO_BF16_VARIABLE}={chosen!r}: use 0 (fp32) or 1 (bf16), or unset it")
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        return supported, f"the CUDA device {'supports' if supported else 'lacks'} bf16"
    units = cpu_bf16_units()
    if units:
        return True, f"this CPU computes bf16 in hardware ({', '.join(units)})"
    return False, "this CPU has no bf16 hardware (AMX or AVX512-BF16), where bf16 is slower than fp32"


def bf16_possible() -> bool:
    """An explicit "enabled": true also runs on any CPU (slowly without bf16 hardware), e.g. to check the bf16 path."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def resolve_ds_config(
    raw: dict, args: TrainArguments, world_size: int, steps_for: Callable[[BatchPlan], int] | None = None
) -> tuple[dict, BatchPlan]:
    """A copy of `raw` with every "auto" resolved, checked against `args`, and the step's batch plan.

    `steps_for` gives the run's optimizer steps for a batch plan (for schedulers' total_num_steps).
    """
    config = copy.deepcopy(raw)
    micro = _merge(config, "train_micro_batch_size_per_gpu", "per_device_train_batch_size",
                   args.per_device_train_batch_size)
    accumulation = _merge(config, "gradient_accumulation_steps", "gradient_accumulation_steps",
                          args.gradient_accumulation_steps)
    for name, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accumulation)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"DeepSpeed config {name}={value!r}: must be an integer >= 1")
    plan = BatchPlan(micro, accumulation, world_size)
    train_batch = config.get("train_batch_size", AUTO)
    if train_batch == AUTO:
        config["train_batch_size"] = plan.global_batch
    elif train_batch != plan.global_batch:
        raise ConfigError(
            f"DeepSpeed config train_batch_size={train_batch} but micro-batch {micro} x accumulation "
            f"{accumulation} x {world_size} ranks = {plan.global_batch}"
        )
    _merge(config, "gradient_clipping", "max_grad_norm", args.max_grad_norm)

    config.setdefault("fp16", {"enabled": False})
    if config["fp16"].get("enabled") == AUTO:
        config["fp16"]["enabled"] = False
    bf16 = config.setdefault("bf16", {"enabled": False})
    if bf16.get("enabled") == AUTO:
        bf16["enabled"], why = auto_bf16()
        said = f'precision: bf16 "auto" -> {"bf16 base" if bf16["enabled"] else "fp32"}: {why}'
        if said not in _SAID:  # once a process, though the trainer resolves the config twice
            _SAID.add(said)
            logger.info(said)
    if config["fp16"]["enabled"]:
        raise ConfigError("fp16 is not supported (mixtures train in fp32 beside the base); use bf16 or fp32")
    if config["bf16"]["enabled"] and not bf16_possible():
        raise ConfigError("the DeepSpeed config enables bf16 but this device does not support it; set it to \"auto\"")

    zero = config.setdefault("zero_optimization", {"stage": 3})
    if zero.get("stage") not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={zero.get('stage')!r}: must be 0, 1, 2 or 3")
    for key, value in list(zero.items()):
        if value == AUTO and key not in LAYER_SIZED:
            zero.pop(key)  # DeepSpeed's own default applies

    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if optimizer.get("type") not in OPTIMIZERS:
        raise ConfigError(f"optimizer.type={optimizer.get('type')!r}: supported are {', '.join(OPTIMIZERS)}")
    params = optimizer.setdefault("params", {})
    _merge(params, "lr", "learning_rate", args.learning_rate, where="optimizer.params.")
    _merge(params, "weight_decay", "weight_decay", args.weight_decay, where="optimizer.params.")
    if optimizer["type"] != "SGD":
        betas = params.get("betas", AUTO)
        if betas == AUTO:
            betas = [AUTO, AUTO]
        resolved = {"0": betas[0], "1": betas[1]}
        _merge(resolved, "0", "adam_beta1", args.adam_beta1, where="optimizer.params.betas[0] ")
        _merge(resolved, "1", "adam_beta2", args.adam_beta2, where="optimizer.params.betas[1] ")
        params["betas"] = [resolved["0"], resolved["1"]]
        _merge(params, "eps", "adam_epsilon", args.adam_epsilon, where="optimizer.params.")

    scheduler = _scheduler_section(config, args.lr_scheduler_type)
    if scheduler is not None:
        sparams, accepted = scheduler.setdefault("params", {}), _schedule_parameters(scheduler["type"])
        for name, value in sparams.items():
            if name not in accepted and value != AUTO:
                raise ConfigError(f"scheduler.params.{name}={value!r} does not apply to {scheduler['type']} (it "
                                  f"takes {', '.join(sorted(accepted))})")
        if "warmup_max_lr" in accepted and sparams.get("warmup_max_lr", AUTO) == AUTO:
            sparams["warmup_max_lr"] = params["lr"]
        if "warmup_min_lr" in accepted and sparams.get("warmup_min_lr", AUTO) == AUTO:
            sparams["warmup_min_lr"] = 0.0
        _merge(sparams, "warmup_num_steps", "warmup_steps", args.warmup_steps, where="scheduler.params.")
        if "total_num_steps" in accepted and sparams.get("total_num_steps", AUTO) == AUTO:
            if steps_for is None:
                raise ConfigError("scheduler.params.total_num_steps is \"auto\" but the number of steps is unknown")
            sparams["total_num_steps"] = steps_for(plan)
        for name in [n for n, v in sparams.items() if v == AUTO]:
            del sparams[name]  # another schedule's, or one nothing here sets (cos_min_ratio): DeepSpeed's default
    return config, plan


def _scheduler_section(config: dict, lr_scheduler_type: str | None) -> dict | None:
    """The scheduler section with its type decided: the config's, or --lr_scheduler_type's where the config
    says "auto" (linear when neither says)."""
    wanted = None
    if lr_scheduler_type is not None:
        if lr_scheduler_type not in SCHEDULER_OF_TYPE:
            raise ConfigError(f"--lr_scheduler_type={lr_scheduler_type!r} is not allowed: one of "
                              f"{', '.join(SCHEDULER_OF_TYPE)}")
        wanted = SCHEDULER_OF_TYPE[lr_scheduler_type]
    scheduler = config.get("scheduler")
    if scheduler is None:
        if wanted is None:
            return None
        scheduler = config["scheduler"] = {"type": wanted}
    kind = scheduler.get("type", AUTO)
    if kind == AUTO:
        kind = wanted or SCHEDULER_OF_TYPE["linear"]
    elif wanted is not None and kind != wanted:
        raise ConfigError(f"--lr_scheduler_type={lr_scheduler_type} asks for DeepSpeed's {wanted} but the config's "
                          f"scheduler.type is {kind!r}; make it \"auto\" or leave out one of the two")
    if kind not in SCHEDULERS:
        raise ConfigError(f"scheduler.type={kind!r}: supported are {', '.join(SCHEDULERS)}")
    scheduler["type"] = kind
    return scheduler


def _schedule_parameters(kind: str) -> set[str]:
    """The keyword parameters of DeepSpeed's schedule class `kind`."""
    import inspect

    from deepspeed.runtime import lr_schedules

    names = set(inspect.signature(getattr(lr_schedules, kind)).parameters)
    return names - {"self", "optimizer", "last_batch_iteration"}


def resolve_layer_sized(config: dict, layer_numel: int) -> None:
    """Resolve "auto" stage3_max_live_parameters and stage3_max_reuse_distance in place: two decoder layers'
    parameters, at most DeepSpeed's default 1e9.

    The coordinator keeps a released weight gathered when it is used again within max_reuse_distance parameters,
    as long as fewer than max_live_parameters are gathered. At DeepSpeed's 1e9 every weight of a base under 1B
    parameters qualifies (each is used again in the backward), so the whole base stays gathered from the second
    step on and ZeRO-3 holds more than a replicated base (measured on large:llama, docs/memory.md). Two
    layers bound the gathered working set to the running layer and the next, and still keep the last layer
    gathered from its forward into the backward that follows at once. A 70B layer is close to 1e9 already.
    """
    zero = config.get("zero_optimization", {})
    for key in LAYER_SIZED:
        if zero.get(key) == AUTO:
            zero[key] = min(MAX_GATHERED, 2 * layer_numel)
