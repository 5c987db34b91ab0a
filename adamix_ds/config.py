"""`MixtureConfig`: the one description of a mixture, shared by the CLI, checkpoints and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

LORA_METHODS = ("adamix-lora", "lora")
ADAPTER_METHODS = ("adamix-adapter", "adapter")
MIXTURE_METHODS = LORA_METHODS + ADAPTER_METHODS
FULL = "full"
METHODS = MIXTURE_METHODS + (FULL,)
SHARE_CHOICES = ("up", "down", "none")
EVAL_MODES = ("merged", "random", "ensemble")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the option, the value and what is allowed."""


def _bad(option: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"--{option}={value!r} is not allowed: {allowed}")


@dataclass
class MixtureConfig:
    """What to inject, where, and how its experts are shared and evaluated.

    `lora` and `adapter` are the single-module baselines: the same code with one expert (M = 1).
    """

    method: str = field(
        default="adamix-lora",
        metadata={"help": f"One of {', '.join(METHODS)} (full: every base weight trained, the upper baseline)."},
    )
    num_experts: Optional[int] = field(
        default=None,
        metadata={"help": "Experts M per insertion point (default 4 for adamix-*, and always 1 for lora/adapter)."},
    )
    share: str = field(
        default="up",
        metadata={"help": "Which side is one shared module: up (reference default), down or none."},
    )
    target_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": "LoRA targets: comma-separated module-name suffixes, 're:<regex>' full-name patterns, "
            "or 'all-linear'. Default: the model family's query and value projections."
        },
    )
    lora_r: int = field(default=4, metadata={"help": "LoRA rank r (reference: 4)."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    adapter_size: int = field(default=8, metadata={"help": "Bottleneck width of the adapters (reference: 8)."})
    adapter_activation: str = field(
        default="gelu", metadata={"help": f"Adapter activation, one of {', '.join(ACTIVATIONS)}."}
    )
    adapter_after_attention: bool = field(
        default=False, metadata={"help": "Also place an adapter after each attention block's output."}
    )
    eval_mode: str = field(
        default="merged",
        metadata={"help": f"Routing outside training, one of {', '.join(EVAL_MODES)}."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _bad("method", self.method, f"one of {', '.join(METHODS)}")
        if self.eval_mode not in EVAL_MODES:
            raise _bad("eval_mode", self.eval_mode, f"one of {', '.join(EVAL_MODES)}")
        if self.method == FULL:
            if self.num_experts not in (None, 1):
                raise _bad("num_experts", self.num_experts, "unset or 1 for --method full (no mixture)")
            self.num_experts = 1
            return
        if self.num_experts is None:
            self.num_experts = 4 if self.method.startswith("adamix-") else 1
        if self.num_experts < 1:
            raise _bad("num_experts", self.num_experts, "an integer >= 1")
        if self.method in ("lora", "adapter") and self.num_experts != 1:
            raise _bad("num_experts", self.num_experts, f"1 for --method {self.method}; use adamix-{self.method}")
        if self.share not in SHARE_CHOICES:
            raise _bad("share", self.share, f"one of {', '.join(SHARE_CHOICES)}")
        if self.method in ("lora", "adapter") and self.share != "up":
            raise _bad("share", self.share, f"only with adamix-* methods (--method {self.method} has one module)")
        if self.is_lora:
            if self.lora_r <= 0:
                raise _bad("lora_r", self.lora_r, "an integer > 0")
            if self.lora_alpha <= 0:
                raise _bad("lora_alpha", self.lora_alpha, "a number > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise _bad("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        else:
            if self.target_modules is not None:
                raise _bad("target_modules", self.target_modules, f"only for LoRA methods ({', '.join(LORA_METHODS)})")
            if self.adapter_size <= 0:
                raise _bad("adapter_size", self.adapter_size, "an integer > 0")
            if self.adapter_activation not in ACTIVATIONS:
                raise _bad("adapter_activation", self.adapter_activation, f"one of {', '.join(ACTIVATIONS)}")

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def experts_down(self) -> int:
        """Experts on the down side (LoRA A, adapter down); 1 when that side is shared."""
        return 1 if self.share == "down" else self.num_experts

    @property
    def experts_up(self) -> int:
        """Experts on the up side (LoRA B, adapter up); 1 when that side is shared."""
        return 1 if self.share == "up" else self.num_experts

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MixtureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown mixture config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def merged(self) -> "MixtureConfig":
        """The configuration of the single module that averaging the experts produces."""
        single = {"adamix-lora": "lora", "adamix-adapter": "adapter"}.get(self.method, self.method)
        return dataclasses.replace(self, method=single, num_experts=1, share="up")
