"""Counter-based routing: reproducible from (seed, step), independent per pass/slot/side, uniform."""

import collections

import pytest
import torch
from conftest import batch, tiny_mixtures

from adamix_ds import ConfigError, MixtureConfig, RoutePlan
from adamix_ds.methods.adamix.stochastic_routing import DOWN, UP, Slot, StochasticRouter, draw_expert, train_expert
from adamix_ds.training.preflight import resolve_eval_modes


def test_same_seed_same_routes_other_seed_different():
    slots = [Slot(i, 8, 8) for i in range(24)]
    a = [RoutePlan.for_step(1234, step, slots, passes=(0, 1)) for step in range(20)]
    b = [RoutePlan.for_step(1234, step, slots, passes=(0, 1)) for step in range(20)]
    c = [RoutePlan.for_step(1235, step, slots, passes=(0, 1)) for step in range(20)]
    assert [p.experts for p in a] == [p.experts for p in b]
    assert [p.digest() for p in a] == [p.digest() for p in b]
    assert sum(p.experts != q.experts for p, q in zip(a, c)) == 20
    assert len({p.digest() for p in a}) == 20


def test_draws_are_uniform_and_independent_per_side_and_pass():
    counts = collections.Counter(draw_expert(4, 7, step) for step in range(8000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(n - 2000) < 200 for n in counts.values()), counts
    down = [train_expert(7, s, 0, 3, DOWN, 4) for s in range(400)]
    up = [train_expert(7, s, 0, 3, UP, 4) for s in range(400)]
    other_pass = [train_expert(7, s, 1, 3, DOWN, 4) for s in range(400)]
    # Independent draws agree about a quarter of the time, not always.
    assert 60 < sum(d == u for d, u in zip(down, up)) < 140
    assert 60 < sum(d == o for d, o in zip(down, other_pass)) < 140
    assert all(train_expert(7, s, 0, 3, DOWN, 1) == 0 for s in range(50))


def test_training_forward_records_the_planned_route_and_micro_batches_share_it():
    model, mixtures = tiny_mixtures("llama", seed=99, num_experts=4, share="none")
    router = mixtures.router
    router.record = []
    model.train()
    for step in (3, 4):
        router.step = step
        for micro in range(2):
            model(batch(seed=micro))
    plans = {s: RoutePlan.for_step(99, s, mixtures.slots()) for s in (3, 4)}
    for step, p, slot, side, expert in router.record:
        assert plans[step].experts[p][slot][side] == expert
    assert len(router.record) == 2 * 2 * 2 * len(mixtures.targets)


def test_consistency_passes_split_the_batch():
    router = StochasticRouter(seed=5)
    with router.use_passes(0, 1):
        choice = router.choose(slot=2, side=DOWN, num_experts=8, training=True, batch_size=4)
    assert choice == [train_expert(5, 0, 0, 2, DOWN, 8), train_expert(5, 0, 1, 2, DOWN, 8)]
    assert router.passes == (0,)
    assert router.choose(2, DOWN, 8, training=False, batch_size=4) == "merged"


def test_keyed_random_evaluation_routes_each_row_by_its_key_alone():
    router = StochasticRouter(seed=5, eval_mode="random")
    with router.keyed_rows([7, 3, 7]):
        together = router.choose(slot=1, side=UP, num_experts=4, training=False, batch_size=3)
    router.count_forward()
    alone = []
    for key in (7, 3, 7):
        with router.keyed_rows([key]):
            alone += router.choose(slot=1, side=UP, num_experts=4, training=False, batch_size=1)
    assert together == alone and together[0] == together[2]
    counts = collections.Counter()
    for key in range(400):
        with router.keyed_rows([key]):
            counts[router.choose(1, UP, 4, training=False, batch_size=1)[0]] += 1
    assert sorted(counts) == [0, 1, 2, 3] and min(counts.values()) > 60  # uniform over the experts
    assert router.row_keys is None
    with pytest.raises(ValueError, match="2 row keys for a batch of 3 rows"), router.keyed_rows([1, 2]):
        router.choose(1, UP, 4, training=False, batch_size=3)


def test_routes_do_not_depend_on_torch_random_state():
    model, mixtures = tiny_mixtures("llama", seed=3, num_experts=4, share="none")
    mixtures.router.record = []
    model.train()
    torch.manual_seed(1)
    model(batch())
    first = list(mixtures.router.record)
    mixtures.router.record = []
    torch.manual_seed(2)
    model(batch())
    assert first == mixtures.router.record


def test_evaluation_modes_follow_the_method():
    assert resolve_eval_modes(MixtureConfig(method="adamix-lora"), None) == ["merged", "random"]
    assert resolve_eval_modes(MixtureConfig(method="lora"), None) == ["merged"]  # one expert: one model
    assert resolve_eval_modes(MixtureConfig(method="adamix-adapter"), " ensemble,merged,ensemble") == ["ensemble",
                                                                                                       "merged"]
    for method in ("moa-soft", "molora", "full"):
        assert resolve_eval_modes(MixtureConfig(method=method), None) == []
        with pytest.raises(ConfigError, match=f"--eval_modes='merged' is not allowed with --method {method}"):
            resolve_eval_modes(MixtureConfig(method=method), "merged")
    for bad in ("merged,top1", " , "):
        with pytest.raises(ConfigError, match="comma-separated from merged, random, ensemble"):
            resolve_eval_modes(MixtureConfig(method="adamix-lora"), bad)
