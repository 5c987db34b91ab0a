"""`MixtureSet`: all mixtures of one model, attached to it by forward hooks.

The mixtures live outside the base model's module tree: the base can then be partitioned by ZeRO-3
while the mixtures stay whole and replicated, and the same object serves a plain single-process model.
Each hook adds a mixture's update to the output of the base module it is attached to.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .config import MixtureConfig
from .mixture_adapter import MixtureAdapter
from .mixture_lora import MixtureLoRA
from .routing import DOWN, UP, Router, Slot
from .targets import Target, resolve_targets


class MixtureSet(nn.Module):
    """The mixtures of one model, one per target, in routing-slot order, with the router they share."""

    def __init__(self, config: MixtureConfig, targets: list[Target], seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.targets = list(targets)
        self.router = Router(seed=seed, eval_mode=config.eval_mode)
        self.mixtures = nn.ModuleList(self._build(t) for t in self.targets)
        self._handles: list = []
        self.folded = False
        """True while the averaged LoRA delta sits inside the base weights (see merging.fold_into_base)."""

    def _build(self, target: Target) -> nn.Module:
        c = self.config
        if c.is_lora:
            return MixtureLoRA(
                target.in_features, target.out_features, c.lora_r, c.lora_alpha,
                c.experts_down, c.experts_up, c.lora_dropout,
            )
        return MixtureAdapter(target.in_features, c.adapter_size, c.adapter_activation, c.experts_down, c.experts_up)

    @classmethod
    def inject(cls, model: nn.Module, config: MixtureConfig, seed: int = 0) -> "MixtureSet":
        """Resolve the config's targets on `model`, build the mixtures and attach them."""
        if config.is_full:
            raise ValueError("--method full trains the base itself; it has no mixtures to inject")
        mixtures = cls(config, resolve_targets(model, config), seed)
        mixtures.attach(model)
        return mixtures

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> None:
        """Hook every mixture onto its target module of `model` (and count the decoder's forwards)."""
        if self.attached:
            raise RuntimeError("this MixtureSet is already attached; detach() it first")
        modules = dict(model.named_modules())
        missing = [t.name for t in self.targets if t.name not in modules]
        if missing:
            raise KeyError(f"the model has no module named {missing[0]!r} ({len(missing)} targets missing)")
        hook = self._lora_hook if self.config.is_lora else self._adapter_hook
        for slot, target in enumerate(self.targets):
            self._handles.append(modules[target.name].register_forward_hook(hook(slot)))
        # The decoder runs once per forward, whether called through the model or by causal_lm_losses.
        decoder = getattr(model, "base_model", model)
        self._handles.append(decoder.register_forward_pre_hook(self.router.count_forward))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

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

    def slots(self) -> list[Slot]:
        return [Slot(i, m.experts_down, m.experts_up) for i, m in enumerate(self.mixtures)]

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(target name + '.' + parameter name, tensor): the keys of every saved mixture file."""
        for target, mixture in zip(self.targets, self.mixtures):
            for pname, param in mixture.named_parameters():
                yield f"{target.name}.{pname}", param

    def target_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_tensors()}
