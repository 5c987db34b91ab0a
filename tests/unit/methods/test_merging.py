"""Merging: averaged experts, folding into the base, and merged evaluation that is never stale."""

import copy

import pytest
import torch
from conftest import FAMILIES, batch, make_model, randomize, tiny_mixtures

from adamix_ds import MixtureConfig, MixtureSet, count_parameters, fold_into_base, merge_experts, unfold_from_base


def _plain_with_averages(model, mixtures):
    """An independent single-module model whose weights are the explicit per-side expert means."""
    plain = MixtureSet.inject(model, mixtures.config.merged(), seed=0)
    with torch.no_grad():
        for mix, single in zip(mixtures.mixtures, plain.mixtures):
            for p, q in zip(mix.parameters(), single.parameters()):
                q.copy_(p.mean(dim=0, keepdim=True))
    return plain


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adamix-lora", "adamix-adapter"])
def test_merged_eval_equals_forward_with_averaged_weights(family, method):
    model, mixtures = tiny_mixtures(family, seed=4, scale=0.2, method=method, num_experts=4, share="none")
    model.eval()
    ids = batch()
    merged_mode = model(ids).logits
    mixtures.detach()
    _plain_with_averages(model, mixtures)
    torch.testing.assert_close(model(ids).logits, merged_mode, rtol=1e-5, atol=1e-5)


def test_merge_experts_has_single_module_parameters_and_same_output():
    model, mixtures = tiny_mixtures("llama", seed=4, scale=0.2, num_experts=8, share="up")
    model.eval()
    ids = batch()
    before = model(ids).logits
    merged = merge_experts(mixtures)
    mixtures.detach()
    merged.attach(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    single = MixtureSet(MixtureConfig(method="lora"), mixtures.targets)
    assert [p.shape for p in merged.parameters()] == [p.shape for p in single.parameters()]
    assert count_parameters(model, merged).trained == count_parameters(model, mixtures).served


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fold_into_base_is_exact_idempotent_and_reversible(family):
    model = make_model(family)
    original = copy.deepcopy(model.state_dict())
    mixtures = MixtureSet.inject(model, MixtureConfig(num_experts=4, share="none"), seed=4)
    randomize(mixtures)
    model.eval()
    ids = batch()
    merged_mode = model(ids).logits
    fold_into_base(model, mixtures)
    fold_into_base(model, mixtures)
    assert not mixtures.attached
    torch.testing.assert_close(model(ids).logits, merged_mode, rtol=1e-5, atol=1e-5)
    # W_after = W + (alpha/r) B_bar A_bar, computed by hand for one target.
    target, mix = mixtures.targets[0], mixtures.mixtures[0]
    delta = mix.scaling * mix.lora_B.mean(0) @ mix.lora_A.mean(0)
    w = dict(model.named_modules())[target.name].weight
    expected = original[target.name + ".weight"] + (delta.T if target.transposed else delta)
    torch.testing.assert_close(w, expected)
    unfold_from_base(model, mixtures)
    assert mixtures.attached
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, merged_mode, rtol=1e-5, atol=1e-5)


def test_merged_eval_is_not_stale_after_training():
    model, mixtures = tiny_mixtures("llama", seed=4, scale=0.2, num_experts=4, share="none")
    optimizer = torch.optim.SGD(mixtures.parameters(), lr=0.5)
    ids = batch()
    model.eval()
    before = model(ids).logits
    model.train()
    model(ids).logits.pow(2).mean().backward()
    optimizer.step()
    model.eval()
    after = model(ids).logits
    assert not torch.allclose(before, after)
    mixtures.detach()
    _plain_with_averages(model, mixtures)
    torch.testing.assert_close(model(ids).logits, after, rtol=1e-5, atol=1e-5)


def test_fold_refuses_adapters():
    model, mixtures = tiny_mixtures("llama", seed=0, method="adamix-adapter")
    with pytest.raises(ValueError, match="only LoRA"):
        fold_into_base(model, mixtures)
    assert mixtures.attached and not mixtures.folded
