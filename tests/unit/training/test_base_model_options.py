"""Options of the base model. --gradient_checkpointing: a decoder layer recomputed in the backward gives the
loss, gradients, routes and router statistics of one that kept its activations, for every family of mixtures
(each layer's hooks do run twice, so the equalities are not vacuous). --attn_implementation: the kernel the
base is built with."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import batch, make_model, randomize

from adamix_ds import MixtureConfig
from adamix_ds.arguments import ModelArguments
from adamix_ds.distributed.sharded_base import _from_source, enable_activation_checkpointing
from adamix_ds.methods.registry import inject_mixtures
from adamix_ds.training.adamix_trainer import AdaMixTrainer
from adamix_ds.training.routed_trainer import RoutedTrainer

CASES = {
    "adamix-lora+consistency+dropout": ("llama", dict(method="adamix-lora", num_experts=4, share="none",
                                                      lora_dropout=0.1), True),
    "adamix-adapter": ("gpt2", dict(method="adamix-adapter", num_experts=4), False),
    "moa-soft+prompt": ("qwen3", dict(method="moa-soft", moa_experts="q,v,adapter,prompt"), False),
    "moa-sparse": ("llama", dict(method="moa-sparse"), False),
    "topk-lora+aux": ("mistral", dict(method="topk-lora", num_experts=4), False),
    "hydralora": ("qwen2", dict(method="hydralora", num_experts=4, lora_dropout=0.1), False),
}


def _train_forward_backward(family, options, consistency, checkpointing):
    """One micro-step of the real trainer code (AdaMixTrainer / RoutedTrainer.micro_step) on a tiny model."""
    model = make_model(family)
    config = MixtureConfig(**options)
    mixtures = inject_mixtures(model, config, seed=7)
    randomize(mixtures)
    if checkpointing:
        enable_activation_checkpointing(model)
    calls = []
    attention = next(m for n, m in model.named_modules() if re.fullmatch(r".*\.(layers|h)\.0\.(self_attn|attn)", n))
    attention.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    router = mixtures.router if config.family == "adamix" else None
    if router is not None:
        router.record = []
    ids = batch(rows=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    trainer = SimpleNamespace(model=model, mixtures=mixtures, router=router, mixture_config=config, step=0,
                              args=SimpleNamespace(consistency_weight=1.0 if consistency else 0.0,
                                                   loss_chunk_tokens=1024, label_smoothing_factor=0.0))
    micro_step = RoutedTrainer.micro_step if config.family == "routed" else AdaMixTrainer.micro_step
    torch.manual_seed(11)  # the dropout masks
    sums = micro_step(trainer, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    grads = {name: p.grad.clone() for name, p in mixtures.named_parameters() if p.grad is not None}
    if router is not None:
        diagnostics = (dict(router.counts), list(router.record))
    else:  # the token counts themselves, not only the means (which double counting would keep)
        diagnostics = ({k: v.tolist() for k, v in mixtures.stats.sums.items()}, mixtures.stats.metrics())
    return sums, grads, diagnostics, len(calls)


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_layers_train_exactly_as_kept_ones(case):
    family, options, consistency = CASES[case]
    sums, grads, diagnostics, calls = _train_forward_backward(family, options, consistency, False)
    sums_c, grads_c, diagnostics_c, calls_c = _train_forward_backward(family, options, consistency, True)
    assert (calls, calls_c) == (1, 2)  # the first layer's attention ran again in the backward
    assert torch.equal(sums_c, sums)  # target tokens, CE, KL and load-balancing sums
    assert grads_c.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0, msg=name)
    assert diagnostics_c == diagnostics and diagnostics


def test_attention_kernel_is_the_one_asked_for_and_computes_the_same():
    ids = batch(rows=2, length=9)
    logits = {}
    for kernel in (None, "eager", "sdpa"):
        torch.manual_seed(0)
        model = _from_source(ModelArguments(model_name_or_path="tiny:llama", attn_implementation=kernel),
                             torch.float32, vocab_size=128).eval()
        assert model.config._attn_implementation == (kernel or "sdpa")
        with torch.no_grad():
            logits[kernel] = model(ids).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_a_model_without_activation_checkpointing_is_refused_before_loading(monkeypatch):
    from transformers import LlamaForCausalLM

    from adamix_ds.config import ConfigError
    from adamix_ds.training.preflight import check_model

    arguments = ModelArguments(model_name_or_path="tiny:llama")
    check_model(arguments, MixtureConfig(), gradient_checkpointing=True)
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    check_model(arguments, MixtureConfig(), gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="--gradient_checkpointing: LlamaForCausalLM does not support"):
        check_model(arguments, MixtureConfig(), gradient_checkpointing=True)
