"""The update of one step equals the gradient of the token-mean loss over the whole global batch, by autograd.

AdamW ignores a gradient's overall size, so the 2-ranks-against-1 and accumulation tests would pass with a wrong
or missing division. Here the real ReplicatedTrainer.train_step runs with plain SGD (lr 1, no momentum, no decay),
so the step moves each weight by exactly its gradient, over two micro-batches whose target-token counts differ
(a per-micro-batch mean would weigh their tokens differently).
"""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_model, randomize

from adamix_ds import MixtureConfig, causal_lm_losses, inject_mixtures
from adamix_ds.data.batching import collate
from adamix_ds.training.adamix_trainer import AdaMixTrainer
from adamix_ds.training.routed_trainer import RoutedTrainer


def _rows(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((9, 2), (12, 7), (6, 1), (11, 3)):
        ids = torch.randint(4, 128, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _trainer(cls, model, mixtures, consistency: float):
    trainer = cls.__new__(cls)
    rows = _rows(0)
    trainer.__dict__.update(
        model=model, mixtures=mixtures, params=list(mixtures.parameters()), step=0, seed=1, mixture_config=mixtures.config,
        router=getattr(mixtures, "router", None), route_log=None, max_grad_norm=0.0, nonfinite_in_a_row=0,
        scheduler=None, train_data=rows, tokenizer=SimpleNamespace(pad_token_id=0),
        base=SimpleNamespace(device=torch.device("cpu")), plan=SimpleNamespace(accumulation=2),
        sampler=SimpleNamespace(rows=lambda step, micro, rank: [2 * micro, 2 * micro + 1]),
        args=SimpleNamespace(consistency_weight=consistency, loss_chunk_tokens=1024, label_smoothing_factor=0.0,
                             check_routes_every=0, max_nonfinite_steps=5),
        optimizer=torch.optim.SGD(mixtures.parameters(), lr=1.0),
    )
    return trainer, rows


@pytest.mark.parametrize("method,consistency", [("adamix-lora", 0.0), ("adamix-lora", 3.0), ("molora", 0.0)])
def test_the_update_is_the_gradient_of_the_global_token_mean(method, consistency):
    model = make_model("llama")
    mixtures = inject_mixtures(model, MixtureConfig(method=method, num_experts=4), seed=3)
    randomize(mixtures, scale=0.2)
    cls = RoutedTrainer if mixtures.config.family == "routed" else AdaMixTrainer
    trainer, rows = _trainer(cls, model, mixtures, consistency)
    before = [p.detach().clone() for p in trainer.params]

    # The reference: one loss over all four rows, CE (and KL) summed over every target token, divided by their count.
    model.train()
    if trainer.router is not None:
        trainer.router.step = 0
    totals, tokens = [], 0
    for micro in range(2):
        batch = collate(rows[2 * micro: 2 * micro + 2], 0)
        torch.manual_seed(0)
        sums = causal_lm_losses(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                router=trainer.router, consistency=consistency > 0)
        totals.append(sums.lm + consistency * sums.kl if consistency > 0 else sums.lm)
        tokens += sums.tokens
    counts = [int((collate(rows[i:i + 2], 0)["labels"][:, 1:] != -100).sum()) for i in (0, 2)]
    assert counts[0] != counts[1]  # unequal micro-batches: a per-micro-batch mean would differ
    expected = torch.autograd.grad(sum(totals) / tokens, trainer.params, allow_unused=True)

    trainer.train_step()
    for p, start, grad in zip(trainer.params, before, expected):
        moved = start - p.detach()
        torch.testing.assert_close(moved, grad if grad is not None else torch.zeros_like(start), rtol=1e-5, atol=1e-7)
    assert any(g is not None and g.abs().max() > 1e-4 for g in expected)
