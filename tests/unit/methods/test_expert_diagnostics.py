"""Expert diagnostics against hand counts and hand-computed cosine distances."""

import collections

import torch
from conftest import batch, tiny_mixtures

from adamix_ds.methods.adamix.expert_diagnostics import expert_divergence, pairwise_cosine_distance, selection_counts
from adamix_ds.methods.targets import layer_of


def test_pairwise_cosine_distance_by_hand():
    orthogonal = torch.eye(3).reshape(3, 3, 1)
    assert pairwise_cosine_distance(orthogonal) == 1.0
    same = torch.ones(4, 2, 2)
    assert abs(pairwise_cosine_distance(same)) < 1e-6
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).reshape(2, 2, 1)
    assert pairwise_cosine_distance(opposite) == 2.0


def test_selection_counts_match_the_recorded_routes():
    model, mixtures = tiny_mixtures("llama", seed=5, num_experts=4, share="up")
    mixtures.router.record = []
    model.train()
    for step in range(6):
        mixtures.router.step = step
        model(batch())
    expected = collections.Counter()
    for _, _, slot, side, expert in mixtures.router.record:
        if side == 0:
            expected[f"experts/selection_count/layer_{layer_of(mixtures.targets[slot].name)}/down/expert_{expert}"] += 1
    assert selection_counts(mixtures) == dict(expected)
    assert sum(expected.values()) == 6 * len(mixtures.targets)
    assert selection_counts(mixtures) == {}  # reset after reading


def test_divergence_per_layer():
    model, mixtures = tiny_mixtures("llama", seed=5, num_experts=2, share="up")
    with torch.no_grad():
        for mixture in mixtures.mixtures:
            mixture.lora_A[1].copy_(-mixture.lora_A[0])
    assert expert_divergence(mixtures) == {"experts/divergence/layer_0": 2.0, "experts/divergence/layer_1": 2.0}
