"""`MixtureConfig`: the one description of a mixture, shared by the CLI, checkpoints and validation, and
`METHODS`: the one table of what each --method is.

Every other layer looks a method's facts up through it: its family picks the trainer (training/recipe.py)
and the export (export/merged_model.py), its kind of experts the mixture class (methods/registry.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ADAMIX, ROUTED, FULL = "adamix", "routed", "full"
"""Families: stochastic routing merged by averaging (AdaMix and its one-expert baselines), learned per-token
routers (MoA, MoE-LoRA), and every base weight trained (the upper baseline)."""


@dataclass(frozen=True)
class Method:
    """What one --method is. Defaults apply to options the user leaves unset (all four are resolved for every
    method, so checkpoints record them the same way)."""

    family: str
    experts: str
    """lora, adapter (AdaMix's stacked experts), moa (heterogeneous experts per layer), routed-lora (a routed LoRA
    per projection) or none."""
    num_experts: Optional[int]
    """M by default; None where --moa_experts lists them."""
    lora_r: int = 4
    lora_alpha: float = 32.0
    adapter_size: int = 8
    adapter_activation: str = "gelu"
    options: tuple[str, ...] = ()
    """Method-specific options it takes; every other one must keep its default."""
    merges_into: Optional[str] = None
    """The one-expert method that averaging its experts produces (AdaMix merging); None when it cannot merge."""
    gate: Optional[str] = None
    """The learned router's gate (methods/routed/token_router.py): sigmoid, threshold, softmax or topk."""
    shared_a: bool = False
    """routed-lora: one LoRA A shared by every expert (HydraLoRA)."""
    train_options: tuple[str, ...] = ()
    """Training options (TrainArguments) that only this method's family takes."""
    expert_init: Optional[str] = None
    """How the experts of a side start: identical copies of one draw, or independent draws."""
    adapter_init: Optional[str] = None
    """How an adapter's weights are drawn: houlsby (starts as the identity) or bert (every weight N(0, 0.02))."""


ADAMIX_TRAINING = ("consistency_weight", "check_routes_every", "save_routes", "eval_modes")
"""Training options of AdaMix's stochastic routing (consistency between two routes, route checks and logs, the
routings evaluated)."""
_LORA = ("target_modules",)
_ADAPTER = ("adapter_after_attention", "adapter_init")
_ADAMIX = dict(train_options=ADAMIX_TRAINING)
_ADAPTERS = dict(_ADAMIX, adapter_init="houlsby")
_MOA = dict(experts="moa", num_experts=None, lora_r=8, lora_alpha=8.0, adapter_size=16, adapter_activation="silu")
_HOMOGENEOUS = dict(experts="routed-lora", num_experts=8, lora_r=8, lora_alpha=8.0)
METHODS: dict[str, Method] = {
    "adamix-lora": Method(ADAMIX, "lora", 4, options=("share", "expert_init", *_LORA), merges_into="lora",
                          expert_init="identical", **_ADAMIX),
    "adamix-adapter": Method(ADAMIX, "adapter", 4, options=("share", "expert_init", *_ADAPTER), merges_into="adapter",
                             expert_init="independent", **_ADAPTERS),
    "lora": Method(ADAMIX, "lora", 1, options=_LORA, merges_into="lora", **_ADAMIX),
    "adapter": Method(ADAMIX, "adapter", 1, options=_ADAPTER, merges_into="adapter", **_ADAPTERS),
    "moa-soft": Method(ROUTED, **_MOA, options=("moa_experts", "router_type", "prompt_length"), gate="sigmoid"),
    "moa-sparse": Method(ROUTED, **_MOA, options=("moa_experts", "router_type", "max_threshold"), gate="threshold"),
    "molora": Method(ROUTED, **_HOMOGENEOUS, options=("router_type", *_LORA), gate="softmax"),
    "hydralora": Method(ROUTED, **_HOMOGENEOUS, options=("router_type", *_LORA), gate="softmax", shared_a=True),
    "topk-lora": Method(ROUTED, **_HOMOGENEOUS, options=("router_type", "top_k", "aux_loss_weight", *_LORA),
                        gate="topk"),
    "full": Method(FULL, "none", 1),
}
MOA_EXPERTS = ("q", "k", "v", "o", "down", "adapter", "prompt")
ROUTER_TYPES = ("linear", "swiglu")
SHARE_CHOICES = ("up", "down", "none")
EVAL_MODES = ("merged", "random", "ensemble")
EXPERT_INITS = ("identical", "independent")
ADAPTER_INITS = ("houlsby", "bert")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")


def methods_taking(option: str) -> list[str]:
    return [name for name, method in METHODS.items() if option in method.options]


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
    expert_init: Optional[str] = field(
        default=None,
        metadata={"help": f"How AdaMix's experts of a side start, one of {', '.join(EXPERT_INITS)}: identical copies of "
                          "one draw (the AdaMix reference deep-copies one LoRA A; experts then differ only through the "
                          "routes that train them) or independent draws. Default: identical for adamix-lora, "
                          "independent for adamix-adapter."},
    )
    adapter_init: Optional[str] = field(
        default=None,
        metadata={"help": f"How adapter weights are drawn, one of {', '.join(ADAPTER_INITS)}: houlsby (down N(0, 0.01), "
                          "up and biases 0: the adapter starts as the identity; the default) or bert (down and up "
                          "N(0, 0.02), biases 0, as the reference's adapters get from BERT's initialisation)."},
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
        spec = self.spec
        if spec.family == FULL:
            if self.num_experts not in (None, 1):
                raise _bad("num_experts", self.num_experts, "unset or 1 for --method full (no mixture)")
            self.num_experts = 1
            return
        for name in ("lora_r", "lora_alpha", "adapter_size", "adapter_activation"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(spec, name))
        for name, allowed in (("expert_init", EXPERT_INITS), ("adapter_init", ADAPTER_INITS)):
            self._only_for(name, None)
            if getattr(self, name) is None:
                setattr(self, name, getattr(spec, name))
            elif getattr(self, name) not in allowed:
                raise _bad(name, getattr(self, name), f"one of {', '.join(allowed)}")
        if spec.experts == "moa":
            self._check_moa()
        else:
            self._only_for("moa_experts", None)
        if self.num_experts is None:
            self.num_experts = spec.num_experts
        if self.num_experts < 1:
            raise _bad("num_experts", self.num_experts, "an integer >= 1")
        if spec.num_experts == 1 and self.num_experts != 1:
            raise _bad("num_experts", self.num_experts, f"1 for --method {self.method}; use adamix-{self.method}")
        if spec.experts == "routed-lora" and self.num_experts < 2:
            raise _bad("num_experts", self.num_experts, f"at least 2 for --method {self.method} (a router needs a choice)")
        if self.share not in SHARE_CHOICES:
            raise _bad("share", self.share, f"one of {', '.join(SHARE_CHOICES)}")
        if self.share != "up" and "share" not in spec.options:
            raise _bad("share", self.share, f"only with adamix-* methods (--method {self.method} shares nothing)")
        if self.router_type not in ROUTER_TYPES:
            raise _bad("router_type", self.router_type, f"one of {', '.join(ROUTER_TYPES)}")
        for name, default in (("top_k", 2), ("max_threshold", 0.5), ("prompt_length", 10), ("router_type", "linear"),
                              ("aux_loss_weight", None), ("adapter_after_attention", False)):
            self._only_for(name, default)
        if "aux_loss_weight" in spec.options:
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
        if spec.experts != "adapter":
            if self.lora_r <= 0:
                raise _bad("lora_r", self.lora_r, "an integer > 0")
            if self.lora_alpha <= 0:
                raise _bad("lora_alpha", self.lora_alpha, "a number > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise _bad("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.target_modules is not None and "target_modules" not in spec.options:
            allowed = f"LoRA methods ({', '.join(methods_taking('target_modules'))})"
            raise _bad("target_modules", self.target_modules, f"only for {allowed}" +
                       ("; moa-* choose experts with --moa_experts" if spec.experts == "moa" else ""))
        if spec.experts != "lora":
            if self.adapter_size <= 0:
                raise _bad("adapter_size", self.adapter_size, "an integer > 0")
            if self.adapter_activation not in ACTIVATIONS:
                raise _bad("adapter_activation", self.adapter_activation, f"one of {', '.join(ACTIVATIONS)}")

    def _only_for(self, name: str, default) -> None:
        """An option the method does not take must keep its default."""
        value = getattr(self, name)
        if name not in self.spec.options and value != default:
            raise _bad(name, value, f"only with {', '.join(methods_taking(name))} (not --method {self.method})")

    def _check_moa(self) -> None:
        if self.moa_experts is None:
            default = MOA_EXPERTS if "prompt_length" in self.spec.options else MOA_EXPERTS[:-1]
            self.moa_experts = ",".join(default)
        names = [e.strip() for e in self.moa_experts.split(",") if e.strip()]
        unknown = [e for e in names if e not in MOA_EXPERTS]
        if unknown or not names or len(set(names)) != len(names):
            raise _bad("moa_experts", self.moa_experts, f"distinct names from {', '.join(MOA_EXPERTS)}")
        if "prompt" in names and "prompt_length" not in self.spec.options:
            raise _bad("moa_experts", self.moa_experts, f"no prompt expert with {self.method} (its attention prompt "
                                                        "runs on every token; the sparse variant leaves it out, as MoA "
                                                        "does)")
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
    def spec(self) -> Method:
        """This method's row of METHODS."""
        return METHODS[self.method]

    @property
    def family(self) -> str:
        """adamix (AdaMix and the single-module baselines), routed (learned token routers) or full."""
        return self.spec.family

    @property
    def is_lora(self) -> bool:
        """Its experts are LoRA deltas (they fold into the base weights and export to PEFT)."""
        return self.spec.experts == "lora"

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
        if self.spec.merges_into is None:
            raise ValueError(f"--method {self.method} has input-dependent routers: its experts cannot be averaged")
        return dataclasses.replace(self, method=self.spec.merges_into, num_experts=1, share="up", expert_init=None)
