"""`MoASet`: heterogeneous Mixture-of-Adapters (MoA, arXiv 2506.05928) attached to a frozen decoder by hooks.

Per decoder layer, a `TokenRouter` reads the normed layer input (the output of input_layernorm) and
gates, per token, experts of different structure: LoRA on the q, k, v, o and MLP down projections, a
parallel adapter on the MLP, and (soft only) a zero-gated attention prompt. Each expert's output is
scaled by its gate (Sec. 3.2):  y = W x + sum_e g_e(x) * E_e(x).

Soft MoA runs every expert on every token; Sparse MoA runs an expert only on the tokens whose gate
reaches the token's learned threshold (see token_router.py for the gradient to the threshold).

Under ZeRO-3 the hooks never call a base module: the frozen modules run exactly as without the mixture,
so data-dependent routing cannot change which parameters a rank gathers. The prompt's keys and values
are computed by the frozen k/v projections within their own call, as extra input rows that the hooks
append before the call and split off after it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ...config import MixtureConfig
from ..decoder_layout import PROJECTIONS, DecoderLayerSpec, decoder_layers
from ..hooks import HookedMixtures
from .moa_experts import LoRAExpert, ParallelAdapter, PromptExpert, gated_update
from .router_stats import RouterStats
from .token_router import TokenRouter


class MoALayer(nn.Module):
    """The router and experts of one decoder layer, and the per-forward state its hooks share."""

    def __init__(self, spec: DecoderLayerSpec, config: MixtureConfig, stats: RouterStats) -> None:
        super().__init__()
        self.spec, self.names, self.stats = spec, config.expert_names, stats
        self.column = {name: i for i, name in enumerate(self.names)}
        self.router = TokenRouter(spec.hidden, len(self.names), config.spec.gate, config.router_type,
                                  max_threshold=config.max_threshold)
        self.experts = nn.ModuleDict()
        for name in self.names:
            if name in PROJECTIONS:
                self.experts[name] = LoRAExpert(*spec.projection_shape(name), config.lora_r, config.lora_alpha,
                                                config.lora_dropout)
            elif name == "adapter":
                self.experts[name] = ParallelAdapter(spec.hidden, config.adapter_size, config.adapter_activation)
            else:
                self.experts[name] = PromptExpert(config.prompt_length, spec.hidden, spec.num_heads)
        self.gates = None
        self.state: dict = {}

    def route(self, normed: torch.Tensor, training: bool) -> None:
        x = normed.reshape(-1, normed.shape[-1])
        valid = self.stats.valid_rows(x.shape[0])
        self.gates = self.router(x, valid)
        if training and self.stats.first_visit(self.spec.name):
            self.stats.add(self.spec.name.rsplit(".", 1)[-1], self.names, self.gates, valid)

    def update(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + gate_name * expert_name(x), for x (..., in) and out (..., out)."""
        expert, column = self.experts[name], self.column[name]
        flat = x.reshape(-1, x.shape[-1]).to(next(expert.parameters()).dtype)
        active = None if self.gates.active is None else self.gates.active[:, column]
        delta = gated_update(expert, flat, self.gates.weights[:, column], active)
        return out + delta.reshape(out.shape).to(out.dtype)

    def prompt_output(self, attn: torch.Tensor) -> torch.Tensor:
        """The gated prompt attention added to the attention output attn (B, T, H * D)."""
        spec, state = self.spec, self.state
        query = state.pop("query").reshape(*attn.shape[:-1], spec.num_heads, spec.head_dim)
        cos, sin = state.pop("position")
        query, _ = apply_rotary_pos_emb(query, query, cos, sin, unsqueeze_dim=2)
        keys = state.pop("keys").reshape(-1, spec.num_kv_heads, spec.head_dim)
        values = state.pop("values").reshape(-1, spec.num_kv_heads, spec.head_dim)
        out = self.experts["prompt"].attend(query.reshape(-1, spec.num_heads, spec.head_dim), keys, values)
        out = out * self.gates.weights[:, self.column["prompt"], None]
        return attn + out.reshape(attn.shape).to(attn.dtype)


class MoASet(HookedMixtures):
    """The MoA layers of one model, outside its module tree (replicated under ZeRO-3), attached by hooks."""

    point_type, points_key = DecoderLayerSpec, "layers"

    def __init__(self, config: MixtureConfig, layers: list[DecoderLayerSpec], seed: int = 0) -> None:
        super().__init__(config, layers, seed)
        self.stats = RouterStats()
        self.layers = nn.ModuleList(MoALayer(spec, config, self.stats) for spec in self.points)

    @classmethod
    def locate(cls, model: nn.Module, config: MixtureConfig) -> list[DecoderLayerSpec]:
        return decoder_layers(model)

    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        return ((layer.spec.name, layer) for layer in self.layers)

    def hooks(self, model: nn.Module, modules: dict[str, nn.Module]) -> list:
        handles = [getattr(model, "base_model", model).register_forward_pre_hook(self.stats.new_forward)]
        for layer in self.layers:
            self._attach_layer(layer, lambda suffix, p=layer.spec.name: modules[f"{p}.{suffix}"], handles)
        return handles

    def _attach_layer(self, layer: MoALayer, module, hooks: list) -> None:
        hooks.append(module("input_layernorm").register_forward_hook(
            lambda m, args, out: layer.route(out, m.training)))
        for name in layer.names:
            if name in PROJECTIONS and not (name in ("k", "v") and "prompt" in layer.names):
                hooks.append(module(PROJECTIONS[name]).register_forward_hook(
                    lambda m, args, out, n=name: layer.update(n, args[0], out)))
        if "adapter" in layer.names:
            hooks.append(module("mlp").register_forward_hook(
                lambda m, args, out: layer.update("adapter", args[0], out)))
        if "prompt" in layer.names:
            self._attach_prompt(layer, module, hooks)

    def _attach_prompt(self, layer: MoALayer, module, hooks: list) -> None:
        """Capture the rotary position and the query; compute the prompt's keys and values as extra rows of
        the frozen k/v projections (and of k_norm where queries and keys are normalised)."""
        state, spec = layer.state, layer.spec
        prompt = layer.experts["prompt"].prompt

        def position(m, args, kwargs):
            state["position"] = kwargs["position_embeddings"]

        hooks.append(module("self_attn").register_forward_pre_hook(position, with_kwargs=True))
        query_source = "self_attn.q_norm" if spec.qk_norm else PROJECTIONS["q"]
        hooks.append(module(query_source).register_forward_hook(
            lambda m, args, out: state.__setitem__("query", out)))
        for name, key in (("k", "keys"), ("v", "values")):
            normed = name == "k" and spec.qk_norm
            rows = _ExtraRows(state, "keys_unnormed" if normed else key, lambda x: prompt.to(x.dtype))
            projection = module(PROJECTIONS[name])
            hooks.append(projection.register_forward_pre_hook(rows.append))

            def after(m, args, out, rows=rows, name=name):
                x, y = rows.split(args[0], out)
                return layer.update(name, x, y) if name in layer.names else y

            hooks.append(projection.register_forward_hook(after))
            if normed:
                norm_rows = _ExtraRows(state, key, lambda x: state.pop("keys_unnormed").reshape(-1, x.shape[-1]))
                norm = module("self_attn.k_norm")
                hooks.append(norm.register_forward_pre_hook(norm_rows.append))
                hooks.append(norm.register_forward_hook(lambda m, args, out, r=norm_rows: r.split(args[0], out)[1]))
        hooks.append(module(PROJECTIONS["o"]).register_forward_pre_hook(
            lambda m, args: (layer.prompt_output(args[0]), *args[1:])))


class _ExtraRows:
    """Append rows to a frozen module's input and split them off its output, within one module call.

    The input (..., in) is flattened to (N, in) with the extra rows after it; afterwards the first N rows
    of input and output are reshaped back to (..., in) and (..., out), and the extra output rows are
    kept in state[key].
    """

    def __init__(self, state: dict, key: str, rows) -> None:
        self.state, self.key, self.rows = state, key, rows
        self.shape, self.tokens = None, 0

    def append(self, module, args):
        x = args[0]
        self.shape, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        self.tokens = flat.shape[0]
        return (torch.cat([flat, self.rows(x)]), *args[1:])

    def split(self, x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.state[self.key] = out[self.tokens:]
        return (x[:self.tokens].reshape(*self.shape, x.shape[-1]),
                out[:self.tokens].reshape(*self.shape, out.shape[-1]))
