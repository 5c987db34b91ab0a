"""How experts start: identical copies of one draw (the AdaMix reference) or independent draws; adapters as the
identity (Houlsby) or with every weight N(0, 0.02) (BERT's initialisation, which the reference's adapters get)."""

import math

import pytest
import torch
from conftest import batch, make_model

from adamix_ds import MixtureConfig, MixtureSet, merge_experts
from adamix_ds.config import ConfigError
from adamix_ds.methods.adamix.mixture_adapter import MixtureAdapter
from adamix_ds.methods.adamix.mixture_lora import MixtureLoRA


def _stacks(mixtures):
    return [p for m in mixtures.mixtures for p in m.parameters() if p.dim() == 3 and p.shape[0] > 1]


@pytest.mark.parametrize("options", [dict(method="adamix-lora", share="none", num_experts=4),
                                     dict(method="adamix-adapter", share="none", num_experts=4,
                                          expert_init="identical", adapter_init="bert")])
def test_identical_experts_are_bitwise_equal_and_merge_into_any_one_of_them(options):
    model = make_model("llama")
    torch.manual_seed(0)
    mixtures = MixtureSet.inject(model, MixtureConfig(**options), seed=3)
    assert mixtures.config.expert_init == "identical"
    stacks = _stacks(mixtures)
    assert stacks and all(torch.equal(stack[i], stack[0]) for stack in stacks for i in range(1, stack.shape[0]))
    if options["method"] == "adamix-lora":  # B starts at 0 by design: give it a value shared by every expert
        with torch.no_grad():
            for mixture in mixtures.mixtures:
                mixture.lora_B.copy_(torch.randn(mixture.lora_B.shape[1:]).expand_as(mixture.lora_B))
    ids = batch()
    model.eval()
    merged = model(ids).logits
    mixtures.detach()
    single = merge_experts(mixtures)
    with torch.no_grad():
        for mine, one in zip(mixtures.mixtures, single.mixtures):
            for p, q in zip(mine.parameters(), one.parameters()):
                q.copy_(p[2:3])  # expert 2 alone
    single.attach(model)
    assert single.mixtures[0].experts_down == 1
    torch.testing.assert_close(model(ids).logits, merged, rtol=0, atol=1e-6)


def test_independent_experts_differ_and_the_default_follows_the_reference():
    assert MixtureConfig(method="adamix-lora").expert_init == "identical"
    assert MixtureConfig(method="adamix-adapter").expert_init == "independent"
    model = make_model("llama")
    mixtures = MixtureSet.inject(model, MixtureConfig(num_experts=4, expert_init="independent"), seed=3)
    for stack in _stacks(mixtures):
        assert all(not torch.equal(stack[i], stack[0]) for i in range(1, stack.shape[0]))


def test_lora_a_is_drawn_as_nn_linear_draws_a_weight():
    torch.manual_seed(1)
    lora = MixtureLoRA(400, 30, r=8, alpha=16.0, experts_down=3, experts_up=1, identical=True)
    bound = 1.0 / math.sqrt(400)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert lora.lora_A.abs().max() <= bound and lora.lora_A.abs().max() > 0.95 * bound
    assert torch.count_nonzero(lora.lora_B) == 0


@pytest.mark.parametrize("init,down_std,up_std", [("houlsby", 0.01, 0.0), ("bert", 0.02, 0.02)])
def test_adapter_initialisations(init, down_std, up_std):
    torch.manual_seed(2)
    adapter = MixtureAdapter(512, 64, "gelu", experts_down=2, experts_up=2, init=init)
    for stack, std in ((adapter.adapter_down, down_std), (adapter.adapter_up, up_std)):
        if std == 0:
            assert torch.count_nonzero(stack) == 0
        else:  # 65,536 draws: the sample deviation is within 2% of std
            assert abs(stack.std().item() - std) < 0.02 * std and abs(stack.mean().item()) < 0.02 * std
    assert torch.count_nonzero(adapter.adapter_down_bias) == torch.count_nonzero(adapter.adapter_up_bias) == 0


def test_init_options_belong_to_their_methods():
    with pytest.raises(ConfigError, match="--expert_init='same' is not allowed: one of identical, independent"):
        MixtureConfig(expert_init="same")
    with pytest.raises(ConfigError, match="--adapter_init='bert' is not allowed: only with adamix-adapter, adapter"):
        MixtureConfig(method="adamix-lora", adapter_init="bert")
    with pytest.raises(ConfigError, match="--expert_init='identical' is not allowed: only with adamix-lora"):
        MixtureConfig(method="molora", expert_init="identical")
    round_trip = MixtureConfig(method="adamix-adapter", adapter_init="bert")
    assert MixtureConfig.from_dict(round_trip.to_dict()) == round_trip
    assert MixtureConfig.from_dict(MixtureConfig(method="lora").to_dict()) == MixtureConfig(method="lora")
