"""`MixtureConfig`: the one description of a mixture, shared by the CLI, checkpoints and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

LORA_METHODS = ("adamix-lora", "lora")
ADAPTER_METHODS = ("adamix-adapter", "adapter")
MOA_METHODS = ("moa-soft", "moa-sparse")
HOMOGENEOUS_METHODS = ("molora", "hydralora", "topk-lora")
ROUTED_METHODS = MOA_METHODS + HOMOGENEOUS_METHODS
MIXTURE_METHODS = LORA_METHODS + ADAPTER_METHODS
FULL = "full"
METHODS = MIXTURE_METHODS + ROUTED_METHODS + (FULL,)
MOA_EXPERTS = ("q", "k", "v", "o", "down", "adapter", "prompt")
ROUTER_TYPES = ("linear", "swiglu")
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
    The routed methods (moa-soft, moa-sparse, molora, hydralora, topk-lora) gate experts per token with a
    learned router; options left unset take each family's reference default (see `__post_init__`).
    """

    method: str = field(
        default="adamix-lora",
        metadata={"help": f"One of {', '.join(METHODS)} (full: every base weight trained, the upper baseline)."},
    )
    num_experts: Optional[int] = field(
        default=None,
        metadata={"help": "Experts M per insertion point (default 4 for adamix-*, 8 for molora/hydralora/topk-lora, "
                          "always 1 for lora/adapter; moa-* take theirs from --moa_experts)."},
    )
    share: str = field(
        default="up",
        metadata={"help": "Which side is one shared module: up (reference default), down or none."},
    )
    target_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": "LoRA targets: comma-separated module-name suffixes, 're:<regex>' full-name patterns, "
            "or 'all-linear'. Default: the model family's query and value projections (AdaMix, LoRA), "
            "q, k, v, o and down projections (molora, hydralora, topk-lora)."
        },
    )
    lora_r: Optional[int] = field(default=None, metadata={"help": "LoRA rank r (default 4 as in AdaMix; 8 for "
                                                                  "the routed methods, as in MoA)."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha; the update is scaled by "
                                                                        "alpha / r (default 32; 8 for routed methods)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    adapter_size: Optional[int] = field(default=None, metadata={"help": "Bottleneck width of the adapters "
                                                                        "(default 8 as in AdaMix; 16 for moa-*)."})
    adapter_activation: Optional[str] = field(
        default=None, metadata={"help": f"Adapter activation, one of {', '.join(ACTIVATIONS)} (default gelu; silu "
                                        "for moa-*)."}
    )
    adapter_after_attention: bool = field(
        default=False, metadata={"help": "Also place an adapter after each attention block's output."}
    )
    eval_mode: str = field(
        default="merged",
        metadata={"help": f"Routing outside training, one of {', '.join(EVAL_MODES)}."},
    )
    moa_experts: Optional[str] = field(
        default=None,
        metadata={"help": f"Experts of each moa-* layer, comma-separated from {', '.join(MOA_EXPERTS)} (LoRA on "
                          "q/k/v/o/down projections, a parallel MLP adapter, a zero-gated attention prompt). Default: "
                          "all seven for moa-soft; all but prompt for moa-sparse."},
    )
    router_type: str = field(
        default="linear",
        metadata={"help": f"Router network of the routed methods: {', '.join(ROUTER_TYPES)} (SwiGLU hidden 4 x experts)."},
    )
    max_threshold: float = field(
        default=0.5, metadata={"help": "moa-sparse: the learned per-token threshold is sigmoid(.) x this."}
    )
    prompt_length: int = field(default=10, metadata={"help": "moa-soft prompt expert: learned prompt vectors per layer."})
    top_k: int = field(default=2, metadata={"help": "topk-lora: experts kept per token."})
    aux_loss_weight: Optional[float] = field(
        default=None,
        metadata={"help": "topk-lora: weight of the load-balancing loss (Switch Transformer form; default 0.01, 0 = off)."},
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
        routed, moa = self.is_routed, self.method in MOA_METHODS
        self._default("lora_r", 8 if routed else 4)
        self._default("lora_alpha", 8.0 if routed else 32.0)
        self._default("adapter_size", 16 if moa else 8)
        self._default("adapter_activation", "silu" if moa else "gelu")
        if moa:
            self._check_moa()
        else:
            self._only_for("moa_experts", self.moa_experts, None, "moa-soft and moa-sparse")
        if self.num_experts is None:
            self.num_experts = 8 if self.method in HOMOGENEOUS_METHODS else 4 if self.method.startswith("adamix-") else 1
        if self.num_experts < 1:
            raise _bad("num_experts", self.num_experts, "an integer >= 1")
        if self.method in ("lora", "adapter") and self.num_experts != 1:
            raise _bad("num_experts", self.num_experts, f"1 for --method {self.method}; use adamix-{self.method}")
        if self.method in HOMOGENEOUS_METHODS and self.num_experts < 2:
            raise _bad("num_experts", self.num_experts, f"at least 2 for --method {self.method} (a router needs a choice)")
        if self.share not in SHARE_CHOICES:
            raise _bad("share", self.share, f"one of {', '.join(SHARE_CHOICES)}")
        if (self.method in ("lora", "adapter") or routed) and self.share != "up":
            raise _bad("share", self.share, f"only with adamix-* methods (--method {self.method} shares nothing)")
        if self.router_type not in ROUTER_TYPES:
            raise _bad("router_type", self.router_type, f"one of {', '.join(ROUTER_TYPES)}")
        self._only_for("top_k", self.top_k, 2, "topk-lora", self.method == "topk-lora")
        self._only_for("max_threshold", self.max_threshold, 0.5, "moa-sparse", self.method == "moa-sparse")
        self._only_for("prompt_length", self.prompt_length, 10, "moa-soft", self.method == "moa-soft")
        self._only_for("router_type", self.router_type, "linear", "routed methods", routed)
        self._only_for("aux_loss_weight", self.aux_loss_weight, None, "topk-lora", self.method == "topk-lora")
        if self.method == "topk-lora":
            if self.aux_loss_weight is None:
                self.aux_loss_weight = 0.01
            if not 1 <= self.top_k < self.num_experts:
                raise _bad("top_k", self.top_k, f"an integer in [1, {self.num_experts}) (--num_experts {self.num_experts})")
            if self.aux_loss_weight < 0:
                raise _bad("aux_loss_weight", self.aux_loss_weight, "a number >= 0")
        if not 0.0 < self.max_threshold <= 1.0:
            raise _bad("max_threshold", self.max_threshold, "a number in (0, 1]")
        if self.prompt_length < 1:
            raise _bad("prompt_length", self.prompt_length, "an integer >= 1")
        if self.is_lora or routed:
            if self.lora_r <= 0:
                raise _bad("lora_r", self.lora_r, "an integer > 0")
            if self.lora_alpha <= 0:
                raise _bad("lora_alpha", self.lora_alpha, "a number > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise _bad("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if not self.is_lora and self.method not in HOMOGENEOUS_METHODS and self.target_modules is not None:
            allowed = f"LoRA methods ({', '.join(LORA_METHODS + HOMOGENEOUS_METHODS)})"
            raise _bad("target_modules", self.target_modules, f"only for {allowed}" +
                       ("; moa-* choose experts with --moa_experts" if moa else ""))
        if not self.is_lora:
            if self.adapter_size <= 0:
                raise _bad("adapter_size", self.adapter_size, "an integer > 0")
            if self.adapter_activation not in ACTIVATIONS:
                raise _bad("adapter_activation", self.adapter_activation, f"one of {', '.join(ACTIVATIONS)}")

    def _default(self, name: str, value) -> None:
        if getattr(self, name) is None:
            setattr(self, name, value)

    def _only_for(self, name: str, value, default, methods: str, applies: bool = False) -> None:
        if not applies and value != default:
            raise _bad(name, value, f"only with {methods} (not --method {self.method})")

    def _check_moa(self) -> None:
        if self.moa_experts is None:
            default = MOA_EXPERTS if self.method == "moa-soft" else MOA_EXPERTS[:-1]
            self.moa_experts = ",".join(default)
        names = [e.strip() for e in self.moa_experts.split(",") if e.strip()]
        unknown = [e for e in names if e not in MOA_EXPERTS]
        if unknown or not names or len(set(names)) != len(names):
            raise _bad("moa_experts", self.moa_experts, f"distinct names from {', '.join(MOA_EXPERTS)}")
        if self.method == "moa-sparse" and "prompt" in names:
            raise _bad("moa_experts", self.moa_experts, "no prompt expert with moa-sparse (its attention prompt runs "
                                                        "on every token; the sparse variant leaves it out, as MoA does)")
        if len(names) < 2:
            raise _bad("moa_experts", self.moa_experts, "at least two experts (a router needs a choice)")
        self.moa_experts = ",".join(e for e in MOA_EXPERTS if e in names)
        if self.num_experts not in (None, len(names)):
            raise _bad("num_experts", self.num_experts, f"unset for moa-* (the experts are listed by --moa_experts: "
                                                        f"{self.moa_experts})")
        self.num_experts = len(names)

    @property
    def expert_names(self) -> list[str]:
        """moa-*: the experts of each layer, in router-output order."""
        return self.moa_experts.split(",") if self.moa_experts else []

    @property
    def family(self) -> str:
        """adamix (AdaMix and the single-module baselines), routed (learned token routers) or full."""
        return "full" if self.is_full else "routed" if self.is_routed else "adamix"

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    @property
    def is_lora(self) -> bool:
        """AdaMix-LoRA or plain LoRA (mergeable into the base weights)."""
        return self.method in LORA_METHODS

    @property
    def is_routed(self) -> bool:
        """Experts gated per token by a learned router (MoA and the homogeneous MoE-LoRA baselines)."""
        return self.method in ROUTED_METHODS

    @property
    def aux_weight(self) -> float:
        """Weight of the load-balancing loss in the training objective (0 where the method has none)."""
        return self.aux_loss_weight or 0.0

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
        if self.is_routed:
            raise ValueError(f"--method {self.method} has input-dependent routers: its experts cannot be averaged")
        single = {"adamix-lora": "lora", "adamix-adapter": "adapter"}.get(self.method, self.method)
        return dataclasses.replace(self, method=single, num_experts=1, share="up")
