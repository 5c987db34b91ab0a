"""`MoELoRASet`: the homogeneous MoE-LoRA baselines (molora, hydralora, topk-lora), one `RoutedLoRA` with its
own router per target projection, attached to a frozen (possibly ZeRO-3 partitioned) model by hooks."""

from __future__ import annotations

from torch import nn

from ...config import MixtureConfig
from ..hooks import TargetMixtures
from ..targets import Target, layer_of, resolve_routed_targets
from .routed_lora import RoutedLoRA
from .router_stats import RouterStats


class MoELoRASet(TargetMixtures):
    """One RoutedLoRA per target projection, each with its own token router, sharing one RouterStats."""

    def __init__(self, config: MixtureConfig, targets: list[Target], seed: int = 0) -> None:
        super().__init__(config, targets, seed)
        self.stats = RouterStats()
        self.expert_labels = [f"expert_{e}" for e in range(config.num_experts)]
        self.mixtures = nn.ModuleList(
            RoutedLoRA(t.in_features, t.out_features, config.lora_r, config.lora_alpha, config.num_experts,
                       shared_a=config.spec.shared_a, gate=config.spec.gate,
                       network=config.router_type, top_k=config.top_k, dropout=config.lora_dropout)
            for t in self.targets
        )

    @classmethod
    def locate(cls, model: nn.Module, config: MixtureConfig) -> list[Target]:
        return resolve_routed_targets(model, config)

    def hooks(self, model: nn.Module, modules: dict[str, nn.Module]) -> list:
        handles = [modules[t.name].register_forward_hook(self._hook(t, m)) for t, m in zip(self.targets, self.mixtures)]
        handles.append(getattr(model, "base_model", model).register_forward_pre_hook(self.stats.new_forward))
        return handles

    def _hook(self, target: Target, mixture: RoutedLoRA):
        layer = layer_of(target.name)

        def add_routed_lora(module, args, output):
            x = args[0]
            valid = self.stats.valid_rows(x.numel() // x.shape[-1])
            delta, gates = mixture(x, valid)
            if module.training and self.stats.first_visit(target.name):
                self.stats.add(layer, self.expert_labels, gates, valid)
                self.stats.add_aux_loss(gates.aux_loss)
            return output + delta

        return add_routed_lora
