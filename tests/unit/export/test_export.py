"""PEFT export round trip and strict loading of mixture checkpoints."""

import copy
import json

import pytest
import torch
from conftest import FAMILIES, batch, make_model, randomize, tiny_mixtures
from safetensors.torch import load_file, save_file

from adamix_ds import CheckpointMismatch, MixtureConfig, MixtureSet, export_peft_adapter, load_mixtures, save_mixtures
from adamix_ds.export.mixture_checkpoint import CONFIG_NAME, WEIGHTS_NAME


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_round_trip_matches_merged_logits(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model(family)
    base_copy = copy.deepcopy(model)
    mixtures = MixtureSet.inject(model, MixtureConfig(num_experts=4, share="none", lora_r=4, lora_alpha=16), seed=3)
    randomize(mixtures)
    model.eval()
    ids = batch()
    ours = model(ids).logits
    export_peft_adapter(mixtures, tmp_path / "adapter", base_model_name_or_path="tiny")
    loaded = peft.PeftModel.from_pretrained(base_copy, tmp_path / "adapter")
    loaded.eval()
    torch.testing.assert_close(loaded(ids).logits, ours, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["fan_in_fan_out"] == (family == "gpt2")


def test_peft_export_refuses_adapters(tmp_path):
    model, mixtures = tiny_mixtures("llama", seed=0, method="adamix-adapter")
    with pytest.raises(ValueError, match="PEFT export is for LoRA"):
        export_peft_adapter(mixtures, tmp_path)


@pytest.mark.parametrize("method", ["adamix-lora", "adamix-adapter"])
def test_mixture_checkpoint_round_trip(method, tmp_path):
    model = make_model("qwen2")
    config = MixtureConfig(method=method, num_experts=3, share="down")
    mixtures = MixtureSet.inject(model, config, seed=17)
    randomize(mixtures)
    ids = batch()
    model.train()
    mixtures.router.step = 4
    expected = model(ids).logits
    save_mixtures(mixtures, tmp_path)
    fresh = make_model("qwen2")
    restored = load_mixtures(fresh, tmp_path, expected=config)
    assert restored.router.seed == 17
    restored.router.step = 4
    fresh.train()
    torch.testing.assert_close(fresh(ids).logits, expected, rtol=0, atol=0)


def _saved(tmp_path):
    model, mixtures = tiny_mixtures("llama", seed=1, num_experts=2)
    save_mixtures(mixtures, tmp_path)
    return load_file(str(tmp_path / WEIGHTS_NAME))


def test_strict_loading_names_missing_key(tmp_path):
    state = _saved(tmp_path)
    name = "model.layers.1.self_attn.v_proj.lora_B"
    del state[name]
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointMismatch, match=f"missing keys.*{name}"):
        load_mixtures(make_model("llama"), tmp_path)


def test_strict_loading_names_unexpected_key(tmp_path):
    state = _saved(tmp_path)
    state["model.layers.0.mlp.up_proj.lora_A"] = torch.zeros(2, 4, 32)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointMismatch, match="unexpected keys.*mlp.up_proj.lora_A"):
        load_mixtures(make_model("llama"), tmp_path)


def test_strict_loading_names_shape_mismatch(tmp_path):
    state = _saved(tmp_path)
    name = "model.layers.0.self_attn.q_proj.lora_A"
    state[name] = torch.zeros(3, 4, 32)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointMismatch, match=rf"shape of {name}: checkpoint \(3, 4, 32\) vs model \(2, 4, 32\)"):
        load_mixtures(make_model("llama"), tmp_path)


def test_loading_refuses_other_structure(tmp_path):
    _saved(tmp_path)
    requested = MixtureConfig(num_experts=4, share="none")
    with pytest.raises(CheckpointMismatch, match="num_experts: checkpoint 2 vs requested 4; share: checkpoint 'up'"):
        load_mixtures(make_model("llama"), tmp_path, expected=requested)


def test_loading_refuses_targets_the_model_lacks(tmp_path):
    _saved(tmp_path)
    with pytest.raises(CheckpointMismatch, match="modules missing from the model"):
        load_mixtures(make_model("gpt2"), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["format_version"] = 99
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatch, match="format_version"):
        load_mixtures(make_model("llama"), tmp_path)
