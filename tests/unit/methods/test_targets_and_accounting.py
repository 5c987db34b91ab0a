"""Target selection per family, presets and patterns; parameter accounting against hand counts."""

import pytest
from conftest import make_model

from adamix_ds import ConfigError, MixtureConfig, MixtureSet, count_parameters, resolve_targets


@pytest.mark.parametrize(
    "family, suffixes",
    [
        ("llama", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("mistral", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("qwen2", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("qwen3", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("phi", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("gemma", {"self_attn.q_proj", "self_attn.v_proj"}),
        ("gpt2", {"attn.c_attn"}),
        ("gpt_neox", {"attention.query_key_value"}),
    ],
)
def test_family_defaults(family, suffixes):
    targets = resolve_targets(make_model(family), MixtureConfig())
    assert {t.name.split(".", 3)[-1] for t in targets} == suffixes
    assert len(targets) == 2 * len(suffixes)


def test_gpt2_conv1d_is_transposed_with_its_true_shape():
    (first, *_) = resolve_targets(make_model("gpt2"), MixtureConfig())
    assert (first.in_features, first.out_features, first.transposed) == (32, 96, True)


def test_all_linear_patterns_and_regex():
    model = make_model("llama")
    every = resolve_targets(model, MixtureConfig(target_modules="all-linear"))
    assert len(every) == 2 * 7 and all("lm_head" not in t.name for t in every)
    some = resolve_targets(model, MixtureConfig(target_modules="o_proj, mlp.down_proj"))
    assert [t.name for t in some] == [
        "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj",
    ]
    regex = resolve_targets(model, MixtureConfig(target_modules=r"re:model\.layers\.1\..*_proj"))
    assert len(regex) == 7 and all(".1." in t.name for t in regex)


def test_pattern_matching_nothing_lists_the_linear_layers():
    with pytest.raises(ConfigError, match=r"'query' matches no linear layer; linear layers: .*model\.layers\.\*\.self_attn\.q_proj"):
        resolve_targets(make_model("llama"), MixtureConfig(target_modules="q_proj,query"))


def test_adapter_sites():
    model = make_model("gpt2")
    names = [t.name for t in resolve_targets(model, MixtureConfig(method="adapter"))]
    assert names == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    names = [t.name for t in resolve_targets(model, MixtureConfig(method="adapter", adapter_after_attention=True))]
    assert names == ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1.mlp"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="prefix"), "--method='prefix'"),
        (dict(num_experts=0), "--num_experts=0"),
        (dict(method="lora", num_experts=4), "use adamix-lora"),
        (dict(share="both"), "--share='both'"),
        (dict(method="lora", share="none"), "--share='none' is not allowed: only with adamix-\\* methods"),
        (dict(lora_r=0), "--lora_r=0"),
        (dict(method="adapter", adapter_size=-1), "--adapter_size=-1"),
        (dict(method="adapter", target_modules="q_proj"), "only for LoRA methods"),
        (dict(eval_mode="best"), "--eval_mode='best'"),
    ],
)
def test_config_errors_name_the_option(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MixtureConfig(**kwargs)


def test_parameter_accounting_by_hand():
    model = make_model("llama")
    base = sum(p.numel() for p in model.parameters())
    mixtures = MixtureSet.inject(model, MixtureConfig(num_experts=4, share="up", lora_r=4), seed=0)
    count = count_parameters(model, mixtures)
    # Per layer: q_proj 32 -> 32, v_proj 32 -> 16 (2 kv heads of 8); 4 A experts (4 x 32), one shared B.
    per_layer_trained = 4 * (4 * 32) + 32 * 4 + 4 * (4 * 32) + 16 * 4
    per_layer_served = (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)
    assert count.base == base
    assert count.trained == 2 * per_layer_trained
    assert count.served == 2 * per_layer_served
    assert count.served_percent == pytest.approx(100 * 2 * per_layer_served / base)

    adapters = MixtureSet.inject(make_model("llama"), MixtureConfig(method="adamix-adapter", num_experts=3,
                                                                    share="none", adapter_size=8), seed=0)
    one = 8 * 32 + 8 + 32 * 8 + 32
    assert count_parameters(model, adapters).trained == 2 * 3 * one
    assert count_parameters(model, adapters).served == 2 * one
