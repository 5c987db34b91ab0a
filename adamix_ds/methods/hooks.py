"""`HookedMixtures`: what every family of mixtures shares (AdaMix, MoA, MoE-LoRA).

The trainable modules live outside the base model's module tree: the base can be partitioned by ZeRO-3
while the mixtures stay whole and replicated, and the same object serves a plain single-process model.
Forward hooks on the base modules add the mixtures' updates; `detach()` restores the bare base.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import ClassVar, Iterator

import torch
from torch import nn

from ..config import ConfigError, MixtureConfig
from .targets import Target


class HookedMixtures(nn.Module):
    """Subclasses say where they go (`locate`), what they hold per module (`parts`) and how they hook in.

    The insertion points are frozen dataclasses of `point_type` with a `name`; checkpoints store them
    under `points_key`.
    """

    point_type: ClassVar[type]
    points_key: ClassVar[str]

    def __init__(self, config: MixtureConfig, points: list, seed: int = 0) -> None:
        super().__init__()
        self.config, self.seed = config, seed
        self.points = list(points)
        self._handles: list = []

    # What a family provides.
    @classmethod
    def locate(cls, model: nn.Module, config: MixtureConfig) -> list:
        """The insertion points on `model` (the constructor's second argument)."""
        raise NotImplementedError

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        """(name of the base module it belongs to, trainable module), in a fixed order."""
        raise NotImplementedError

    def hooks(self, model: nn.Module, modules: dict[str, nn.Module]) -> list:
        """Register the forward hooks on the named base modules; return their handles."""
        raise NotImplementedError

    # Shared.
    def describe(self) -> dict:
        """JSON-able structure that `from_description` rebuilds the (untrained) mixtures from."""
        return {self.points_key: [asdict(p) for p in self.points]}

    @classmethod
    def from_description(cls, config: MixtureConfig, description: dict, seed: int) -> "HookedMixtures":
        return cls(config, [cls.point_type(**p) for p in description[cls.points_key]], seed)

    @classmethod
    def inject(cls, model: nn.Module, config: MixtureConfig, seed: int = 0) -> "HookedMixtures":
        """Locate the insertion points on `model`, build the mixtures and attach them."""
        mixtures = cls(config, cls.locate(model, config), seed)
        mixtures.attach(model)
        return mixtures

    def module_names(self) -> list[str]:
        return [p.name for p in self.points]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> None:
        if self.attached:
            raise RuntimeError(f"this {type(self).__name__} is already attached; detach() it first")
        modules = dict(model.named_modules())
        missing = [n for n in self.module_names() if n not in modules]
        if missing:
            raise KeyError(f"the model has no module named {missing[0]!r} ({len(missing)} insertion points missing)")
        self._handles = self.hooks(model, modules)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(base module name + '.' + parameter name, tensor): the keys of every saved mixture file."""
        for name, part in self.parts():
            for pname, param in part.named_parameters():
                yield f"{name}.{pname}", param

    def target_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_tensors()}

    def set_eval_mode(self, mode: str) -> None:
        """How the experts combine outside training. Learned routers combine them one way, their own ("merged",
        the default of --eval_mode, names it); AdaMix's stochastic routing has more."""
        if mode != "merged":
            raise ConfigError(f"--eval_mode={mode!r} is not allowed with --method {self.config.method}: its learned "
                              "routers decide how the experts combine")

    def served_parameters(self) -> int:
        """Parameters a user serves after training: every expert and router, where routing depends on the input."""
        return sum(p.numel() for p in self.parameters())


class TargetMixtures(HookedMixtures):
    """A family with one trainable module per target linear (AdaMix's MixtureSet, MoE-LoRA's MoELoRASet).

    Subclasses fill `self.mixtures` in target order.
    """

    point_type, points_key = Target, "targets"
    mixtures: nn.ModuleList

    @property
    def targets(self) -> list[Target]:
        return self.points

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        return ((t.name, m) for t, m in zip(self.targets, self.mixtures))
