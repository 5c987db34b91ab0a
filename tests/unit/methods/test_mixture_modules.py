"""Mixture modules against hand-written formulas and the base model."""

import copy

import pytest
import torch
from conftest import FAMILIES, batch, make_model, randomize, tiny_mixtures
from torch.nn import functional as F

from adamix_ds import MixtureConfig, MixtureSet
from adamix_ds.methods.adamix.mixture_adapter import MixtureAdapter
from adamix_ds.methods.adamix.mixture_lora import MixtureLoRA


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adamix-lora", "adamix-adapter"])
def test_step_zero_output_equals_base(family, method):
    model = make_model(family)
    ids = batch()
    model.train()
    expected = model(ids).logits
    MixtureSet.inject(model, MixtureConfig(method=method, num_experts=4, share="none"), seed=5)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


def test_lora_routed_update_matches_formula():
    mix = MixtureLoRA(6, 5, r=3, alpha=12.0, experts_down=4, experts_up=4)
    torch.nn.init.normal_(mix.lora_B)
    x = torch.randn(4, 2, 6)
    A, B, s = mix.lora_A.detach(), mix.lora_B.detach(), 12.0 / 3
    # One route for the whole batch.
    out = mix(x, [2], [1])
    torch.testing.assert_close(out, s * (x @ A[2].T) @ B[1].T)
    # Two row groups, two routes (the consistency forward).
    out = mix(x, [2, 0], [1, 3])
    expected = torch.cat([s * (x[:2] @ A[2].T) @ B[1].T, s * (x[2:] @ A[0].T) @ B[3].T])
    torch.testing.assert_close(out, expected)
    # Merged: the experts of each side averaged separately.
    torch.testing.assert_close(mix(x, "merged", "merged"), s * (x @ A.mean(0).T) @ B.mean(0).T)
    # Ensemble: mean over paired experts of their outputs.
    expected = sum(s * (x @ A[i].T) @ B[i].T for i in range(4)) / 4
    torch.testing.assert_close(mix(x, "ensemble", "ensemble"), expected)


def test_adapter_routed_update_matches_formula():
    mix = MixtureAdapter(hidden=6, size=3, activation="gelu", experts_down=1, experts_up=3)
    for p in mix.parameters():
        torch.nn.init.normal_(p)
    h = torch.randn(2, 5, 6)
    D, bd = mix.adapter_down.detach(), mix.adapter_down_bias.detach()
    U, bu = mix.adapter_up.detach(), mix.adapter_up_bias.detach()

    def ref(x, j, up=None, up_bias=None):
        up = U[j] if up is None else up
        up_bias = bu[j] if up_bias is None else up_bias
        return F.gelu(x @ D[0].T + bd[0]) @ up.T + up_bias

    torch.testing.assert_close(mix(h, [0], [2]), ref(h, 2))
    torch.testing.assert_close(mix(h, [0, 0], [2, 1]), torch.cat([ref(h[:1], 2), ref(h[1:], 1)]))
    torch.testing.assert_close(mix(h, [0], "merged"), ref(h, None, U.mean(0), bu.mean(0)))
    torch.testing.assert_close(mix(h, [0], "ensemble"), sum(ref(h, j) for j in range(3)) / 3)


def _peft_lora_model(base, mixtures, family):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=mixtures.config.lora_r, lora_alpha=mixtures.config.lora_alpha, lora_dropout=0.0,
        target_modules=[t.name for t in mixtures.targets], fan_in_fan_out=family == "gpt2",
    )
    model = peft.get_peft_model(base, config)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for target, mix in zip(mixtures.targets, mixtures.mixtures):
            modules[target.name].lora_A["default"].weight.copy_(mix.lora_A[0])
            modules[target.name].lora_B["default"].weight.copy_(mix.lora_B[0])
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_single_expert_equals_peft_lora(family):
    model = make_model(family)
    reference_base = copy.deepcopy(model)
    mixtures = MixtureSet.inject(model, MixtureConfig(method="lora", lora_r=4, lora_alpha=8), seed=1)
    randomize(mixtures)
    peft_model = _peft_lora_model(reference_base, mixtures, family)
    ids = batch()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        getattr(peft_model, mode)()
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_forward_uses_the_recorded_route(family):
    """The logits of a routed forward equal a plain-LoRA model holding exactly the chosen experts."""
    model = make_model(family)
    config = MixtureConfig(method="adamix-lora", num_experts=4, share="none")
    mixtures = MixtureSet.inject(model, config, seed=11)
    randomize(mixtures)
    mixtures.router.step = 7
    mixtures.router.record = []
    model.train()
    logits = model(batch()).logits
    chosen = {(slot, side): e for (_, _, slot, side, e) in mixtures.router.record}
    assert len(chosen) == 2 * len(mixtures.targets)
    mixtures.detach()
    plain = MixtureSet.inject(model, config.merged(), seed=0)
    with torch.no_grad():
        for slot, (mix, single) in enumerate(zip(mixtures.mixtures, plain.mixtures)):
            single.lora_A.copy_(mix.lora_A[chosen[slot, 0]].unsqueeze(0))
            single.lora_B.copy_(mix.lora_B[chosen[slot, 1]].unsqueeze(0))
    torch.testing.assert_close(model(batch()).logits, logits, rtol=1e-6, atol=1e-6)


def test_random_eval_mode_routes_each_example():
    model, mixtures = tiny_mixtures("llama", seed=2, scale=0.2, num_experts=4, share="none")
    mixtures.router.set_eval_mode("random")
    model.eval()
    ids = batch(rows=1).repeat(8, 1)
    first = model(ids).logits
    second = model(ids).logits
    # Identical rows take different experts within a forward, and a new forward draws anew.
    assert any(not torch.allclose(first[0], first[i]) for i in range(1, 8))
    assert not torch.allclose(first, second)
    mixtures.router.set_eval_mode("merged")
    merged = model(ids).logits
    torch.testing.assert_close(merged, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eval mode"):
        mixtures.router.set_eval_mode("sometimes")
