"""`MixtureSet`: the AdaMix mixtures of one model (and the single-module LoRA/adapter baselines).

Each forward hook adds a mixture's update to the output of the base module it is attached to; the
experts are chosen by the `StochasticRouter` they share (see methods/hooks.py for why hooks).
"""

from __future__ import annotations

from torch import nn

from ...config import MixtureConfig
from ..hooks import TargetMixtures
from ..targets import Target, resolve_adapter_targets, resolve_lora_targets
from .mixture_adapter import MixtureAdapter
from .mixture_lora import MixtureLoRA
from .stochastic_routing import DOWN, UP, Slot, StochasticRouter


class MixtureSet(TargetMixtures):
    """The mixtures of one model, one per target, in routing-slot order, with the router they share."""

    def __init__(self, config: MixtureConfig, targets: list[Target], seed: int = 0) -> None:
        super().__init__(config, targets, seed)
        self.router = StochasticRouter(seed=seed, eval_mode=config.eval_mode)
        self.mixtures = nn.ModuleList(self._build(t) for t in self.targets)
        self.folded = False
        """True while the averaged LoRA delta sits inside the base weights (see merging.fold_into_base)."""

    def _build(self, target: Target) -> nn.Module:
        c = self.config
        if c.is_lora:
            return MixtureLoRA(target.in_features, target.out_features, c.lora_r, c.lora_alpha, c.experts_down,
                               c.experts_up, c.lora_dropout, identical=c.expert_init == "identical")
        return MixtureAdapter(target.in_features, c.adapter_size, c.adapter_activation, c.experts_down, c.experts_up,
                              init=c.adapter_init, identical=c.expert_init == "identical")

    @classmethod
    def locate(cls, model: nn.Module, config: MixtureConfig) -> list[Target]:
        return resolve_lora_targets(model, config) if config.is_lora else resolve_adapter_targets(model, config)

    def hooks(self, model: nn.Module, modules: dict[str, nn.Module]) -> list:
        """Hook every mixture onto its target module (and count the decoder's forwards)."""
        hook = self._lora_hook if self.config.is_lora else self._adapter_hook
        handles = [modules[t.name].register_forward_hook(hook(slot)) for slot, t in enumerate(self.targets)]
        # The decoder runs once per forward, whether called through the model or by causal_lm_losses.
        handles.append(getattr(model, "base_model", model).register_forward_pre_hook(self.router.count_forward))
        return handles

    def _route(self, slot: int, mixture: nn.Module, training: bool, rows: int):
        r = self.router
        return (
            r.choose(slot, DOWN, mixture.experts_down, training, rows),
            r.choose(slot, UP, mixture.experts_up, training, rows),
        )

    def _lora_hook(self, slot: int):
        mixture = self.mixtures[slot]

        def add_lora(module, args, output):
            x = args[0]
            down, up = self._route(slot, mixture, module.training, x.shape[0])
            return output + mixture(x, down, up, module.training)

        return add_lora

    def _adapter_hook(self, slot: int):
        mixture = self.mixtures[slot]

        def add_adapter(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            down, up = self._route(slot, mixture, module.training, h.shape[0])
            h = h + mixture(h, down, up, module.training)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return add_adapter

    def set_eval_mode(self, mode: str) -> None:
        self.router.set_eval_mode(mode)

    def served_parameters(self) -> int:
        """The merged module's: each stacked tensor (M, ...) averages into one (AdaMix, Sec. 3.3)."""
        return sum(p.numel() // p.shape[0] for p in self.parameters())

    def slots(self) -> list[Slot]:
        return [Slot(i, m.experts_down, m.experts_up) for i, m in enumerate(self.mixtures)]
