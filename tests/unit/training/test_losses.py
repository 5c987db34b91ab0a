"""The one-forward consistency loss against two separate forward passes, written out by hand, with and without
label smoothing (against torch's cross_entropy(label_smoothing=...))."""

import pytest
import torch
from conftest import FAMILIES, batch, tiny_mixtures
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from adamix_ds import causal_lm_losses


def _labels(ids):
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt: no loss on it
    return labels


def _two_pass_reference(model, router, ids, labels, weight, smoothing=0.0):
    """task CE of pass 1 + weight * 0.5 * (KL(p1 || sg p2) + KL(p2 || sg p1)), per target-token mean, as the AdaMix
    reference computes it (symmetric_KL_loss: kl_div with 'batchmean' over the target tokens, times the weight)."""
    with router.use_passes(0):
        logits_1 = model(ids).logits[:, :-1].float()
    with router.use_passes(1):
        logits_2 = model(ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != -100
    lp1 = F.log_softmax(logits_1[keep], -1)
    lp2 = F.log_softmax(logits_2[keep], -1)
    ce = F.cross_entropy(logits_1[keep], targets[keep], label_smoothing=smoothing)
    kl_12 = F.kl_div(lp2.detach(), lp1, log_target=True, reduction="batchmean")
    kl_21 = F.kl_div(lp1.detach(), lp2, log_target=True, reduction="batchmean")
    return ce + weight * 0.5 * (kl_12 + kl_21)


def _grads(params):
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,smoothing", [("adamix-lora", 0.0), ("adamix-adapter", 0.0), ("adamix-lora", 0.1)])
def test_single_forward_equals_two_passes(family, method, smoothing):
    model, mixtures = tiny_mixtures(family, seed=21, scale=0.5, method=method, num_experts=4, share="none")
    mixtures.router.step = 5
    model.train()
    params = list(mixtures.parameters())
    ids = batch(rows=3, length=9)
    labels = _labels(ids)
    weight = 3.0

    sums = causal_lm_losses(model, ids, labels, router=mixtures.router, consistency=True, chunk_tokens=4,
                            label_smoothing=smoothing)
    loss = sums.mean(weight)
    loss.backward()
    one_forward = _grads(params)

    reference = _two_pass_reference(model, mixtures.router, ids, labels, weight, smoothing)
    reference.backward()
    two_passes = _grads(params)

    assert sums.tokens == int((labels[:, 1:] != -100).sum())
    assert sums.kl.item() > 0
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for g1, g2 in zip(one_forward, two_passes):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_plain_loss_equals_hugging_face_loss():
    model, mixtures = tiny_mixtures("llama", seed=1, scale=0.2, num_experts=4)
    model.train()
    ids = batch(rows=2, length=10)
    labels = _labels(ids)
    sums = causal_lm_losses(model, ids, labels, chunk_tokens=5)
    assert sums.kl is None
    torch.testing.assert_close(sums.mean(), model(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_label_smoothing_equals_torch_and_moves_the_gradient():
    """The chunked, closed-form smoothed loss and its gradients against torch's cross_entropy(label_smoothing)
    through autograd on the full logits; smoothing 0.1 must change both (or the comparison proves nothing)."""
    model, mixtures = tiny_mixtures("llama", seed=1, scale=0.3, num_experts=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits far from uniform, where smoothing changes the loss
    model.train()
    mixtures.router.step = 3
    params = list(mixtures.parameters())
    ids = batch(rows=2, length=10)
    labels = _labels(ids)
    results = {}
    for smoothing in (0.0, 0.1):
        loss = causal_lm_losses(model, ids, labels, chunk_tokens=3, label_smoothing=smoothing).mean()
        loss.backward()
        ours = _grads(params)
        logits = model(ids).logits[:, :-1]
        keep = labels[:, 1:] != -100
        reference = F.cross_entropy(logits[keep], labels[:, 1:][keep], label_smoothing=smoothing)
        reference.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        for g1, g2 in zip(ours, _grads(params)):
            torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
        results[smoothing] = (loss.item(), ours[0])
    assert abs(results[0.0][0] - results[0.1][0]) > 1e-4
    assert not torch.allclose(results[0.0][1], results[0.1][1])


@pytest.mark.parametrize("model_type,scaling", [("cohere", {"logit_scale": 0.3}), ("granite", {"logits_scaling": 4.0})])
def test_plain_loss_follows_the_heads_logit_scaling(model_type, scaling):
    """Cohere multiplies its logits by logit_scale, Granite divides them by logits_scaling: the chunked loss
    equals the model's own loss for both."""
    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **scaling)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    model.lm_head.weight.mul_(50.0)  # logits far from zero, so that their scale matters
    ids = batch(rows=2, length=10)
    labels = _labels(ids)
    own = model(ids, labels=labels).loss
    unscaled = F.cross_entropy(model.lm_head(model.model(ids).last_hidden_state)[:, :-1][labels[:, 1:] != -100],
                               labels[:, 1:][labels[:, 1:] != -100])
    assert abs(own.item() - unscaled.item()) > 1e-2  # the scaling matters for these weights
    torch.testing.assert_close(causal_lm_losses(model, ids, labels, chunk_tokens=7).mean(), own, rtol=1e-5, atol=1e-6)


def test_consistency_needs_an_even_split():
    model, mixtures = tiny_mixtures("llama", seed=1, num_experts=2)
    model.train()
    with pytest.raises(ValueError, match="router"):
        causal_lm_losses(model, batch(), batch(), consistency=True)
    with mixtures.router.use_passes(0, 1), pytest.raises(ValueError, match="cannot be split"):
        model(batch(rows=3))


@pytest.mark.parametrize("softcap,scale,smoothing", [(None, 1.0, 0.0), (3.0, 1.0, 0.0), (None, 0.25, 0.0),
                                                     (3.0, 2.5, 0.0), (3.0, 2.5, 0.2)])
def test_chunked_head_losses_match_autograd(softcap, scale, smoothing):
    """token_losses' closed-form gradients against autograd through full logits (logit scale, soft cap)."""
    from adamix_ds import token_losses

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=True).requires_grad_(False)
    h1 = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    h2 = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    sums = token_losses(head, h1, labels, hidden_2=h2, chunk_tokens=3, softcap=softcap, scale=scale,
                        label_smoothing=smoothing)
    loss = sums.mean(0.7)
    grads = torch.autograd.grad(loss, (h1, h2))

    def logits(h):
        z = head(h[:, :-1]) * scale
        return torch.tanh(z / softcap) * softcap if softcap else z

    keep = labels[:, 1:] != -100
    lp1 = F.log_softmax(logits(h1)[keep], -1)
    lp2 = F.log_softmax(logits(h2)[keep], -1)
    ce = F.cross_entropy(logits(h1)[keep], labels[:, 1:][keep], label_smoothing=smoothing)
    kl = 0.5 * ((lp1.exp() * (lp1 - lp2.detach())).sum(-1) + (lp2.exp() * (lp2 - lp1.detach())).sum(-1)).mean()
    reference = ce + 0.7 * kl
    expected = torch.autograd.grad(reference, (h1, h2))
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_default_chunks_keep_a_cpu_chunks_logits_small_and_change_no_number(monkeypatch):
    """On a CPU a chunk holds as many target tokens as fit CPU_CHUNK_BYTES of fp32 logits (16 MB: 85 tokens of a
    49,152-token vocabulary, at least 16); elsewhere 1,024. Chunks of that size give autograd's losses and gradients,
    with and without the consistency term."""
    from adamix_ds import token_losses
    from adamix_ds.training import losses

    assert losses.default_chunk_tokens(torch.empty(49152, 1)) == 16 * 2**20 // (4 * 49152) == 85
    assert losses.default_chunk_tokens(torch.empty(2**20, 1)) == 16
    assert losses.default_chunk_tokens(torch.empty(49152, 1, device="meta")) == 1024
    monkeypatch.setattr(losses, "CPU_CHUNK_BYTES", 4 * 11 * 16)  # 16 tokens of 11: the smallest chunk
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False).requires_grad_(False)
    h1 = torch.randn(4, 20, 6, generator=g, requires_grad=True)
    h2 = torch.randn(4, 20, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (4, 20), generator=g)
    keep = labels[:, 1:] != -100
    for hidden_2 in (None, h2):
        sums = token_losses(head, h1, labels, hidden_2=hidden_2, label_smoothing=0.1)  # 76 targets: 5 chunks
        loss = sums.mean(0.5)
        wrt = (h1,) if hidden_2 is None else (h1, h2)
        lp1 = F.log_softmax(head(h1[:, :-1])[keep], -1)
        reference = F.cross_entropy(head(h1[:, :-1])[keep], labels[:, 1:][keep], label_smoothing=0.1)
        if hidden_2 is not None:
            lp2 = F.log_softmax(head(h2[:, :-1])[keep], -1)
            reference = reference + 0.5 * 0.5 * ((lp1.exp() * (lp1 - lp2.detach())).sum(-1)
                                                 + (lp2.exp() * (lp2 - lp1.detach())).sum(-1)).mean()
        torch.testing.assert_close(loss, reference)
        for got, want in zip(torch.autograd.grad(loss, wrt), torch.autograd.grad(reference, wrt)):
            torch.testing.assert_close(got, want)
