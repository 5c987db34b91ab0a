"""A bitsandbytes-quantized base (--quantization_bit): every family of mixtures computes over it what it computes
over the dequantized weights; the weights read back as the layers use them; options and refusals.

The reference model is an ordinary fp32 model whose linear weights are bitsandbytes' own dequantization of the
quantized model's (bitsandbytes.functional, called here, not through adamix_ds)."""

import pytest
import torch
from conftest import batch, randomize

from adamix_ds import MixtureConfig
from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import tiny_model
from adamix_ds.config import ConfigError
from adamix_ds.distributed.quantized_weights import base_numel, dequantized_weight, quantized_linears
from adamix_ds.distributed.sharded_base import _from_source, keep_storage_layout
from adamix_ds.methods.registry import inject_mixtures
from adamix_ds.training.preflight import check_quantization

bnb = pytest.importorskip("bitsandbytes")
VOCAB = 128
CPU = torch.device("cpu")

METHODS = {
    "adamix-lora": dict(method="adamix-lora", num_experts=4, share="none"),
    "adamix-adapter": dict(method="adamix-adapter", num_experts=4),
    "lora": dict(method="lora", target_modules="all-linear"),
    "moa-soft": dict(method="moa-soft"),
    "moa-sparse": dict(method="moa-sparse"),
    "molora": dict(method="molora", num_experts=4),
    "hydralora": dict(method="hydralora", num_experts=4),
    "topk-lora": dict(method="topk-lora", num_experts=4),
    "adapter": dict(method="adapter"),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("base")
    tiny_model("llama", vocab_size=VOCAB, seed=0).save_pretrained(directory)
    return directory


def _quantized(base_dir, bits=4, **options):
    args = ModelArguments(model_name_or_path=str(base_dir), quantization_bit=bits, **options)
    model = _from_source(args, torch.float32, VOCAB, device=CPU)
    keep_storage_layout(model)
    return model.requires_grad_(False)


def _dequantized_twin(base_dir, quantized):
    """The fp32 model with every quantized weight replaced by bitsandbytes' dequantization of it."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).requires_grad_(False)
    modules = dict(plain.named_modules())
    for name, layer in quantized.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            value = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            modules[name].weight.data = value.reshape(modules[name].weight.shape).float()
    return plain


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixture_on_a_4bit_base_equals_it_on_the_dequantized_weights(base_dir, method, quant_type):
    quantized = _quantized(base_dir, bnb_4bit_quant_type=quant_type)
    assert len(quantized_linears(quantized)) == 2 * 7
    plain = _dequantized_twin(base_dir, quantized)
    config = MixtureConfig(**METHODS[method])
    outputs = []
    for model in (quantized, plain):
        mixtures = inject_mixtures(model, config, seed=5)
        randomize(mixtures, seed=9)
        model.eval()
        mixtures.eval()
        with torch.no_grad():
            outputs.append(model(batch(rows=2, length=9)).logits)
    assert not torch.equal(outputs[0], _dequantized_twin(base_dir, quantized)(batch(rows=2, length=9)).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_gradients_through_a_4bit_base_equal_those_through_the_dequantized_weights(base_dir):
    quantized = _quantized(base_dir)
    plain = _dequantized_twin(base_dir, quantized)
    grads = []
    for model in (quantized, plain):
        mixtures = inject_mixtures(model, MixtureConfig(method="molora", num_experts=4), seed=5)
        randomize(mixtures, seed=9)
        ids = batch(rows=2, length=9)
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in mixtures.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_dequantized_weight_is_what_the_layer_multiplies_by(base_dir):
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    quantized = _quantized(base_dir)
    layer = quantized.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer(x), x @ dequantized_weight(layer, torch.float32).T, rtol=1e-5, atol=1e-6)


def test_8bit_weights_read_back_within_half_a_quantization_step(base_dir):
    """LLM.int8 rounds each row, taken in fp16, to 127 steps of its largest magnitude (the layer's forward also
    quantizes the activations, so its output is not x @ W^T exactly: docs/memory.md says so)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    quantized = _quantized(base_dir, bits=8)
    weights = dict(original.named_parameters())
    layers = quantized_linears(quantized)
    assert len(layers) == 14
    quantized(batch(rows=2, length=9))  # the first forward moves the row scales to the layer's state
    for name, layer in layers.items():
        w = weights[name].detach()
        step = w.abs().amax(dim=1, keepdim=True) / 127
        error = (dequantized_weight(layer, torch.float32) - w).abs()
        assert bool((error <= step / 2 + (w - w.half().float()).abs() + 1e-8).all()), name


def test_quantized_base_counts_the_weights_it_stands_for(base_dir):
    plain = tiny_model("llama", vocab_size=VOCAB, seed=0)
    for bits in (4, 8):
        assert base_numel(_quantized(base_dir, bits=bits)) == sum(p.numel() for p in plain.parameters())


def test_options_and_refusals():
    with pytest.raises(ConfigError, match="choose 4 or 8"):
        ModelArguments(quantization_bit=3)
    with pytest.raises(ConfigError, match="nf4 or fp4"):
        ModelArguments(bnb_4bit_quant_type="int4")
    with pytest.raises(ConfigError, match="bfloat16, float16, float32"):
        ModelArguments(bnb_4bit_compute_dtype="half")
    with pytest.raises(ConfigError, match="--method full: a quantized base holds frozen"):
        check_quantization(ModelArguments(quantization_bit=4), MixtureConfig(method="full"))
    check_quantization(ModelArguments(quantization_bit=4), MixtureConfig(method="adamix-lora"))
    config = ModelArguments(quantization_bit=4, bnb_4bit_use_double_quant=False).quantization_config(torch.bfloat16)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (True, "nf4", False)
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == torch.bfloat16
    assert ModelArguments(quantization_bit=8).quantization_config(torch.float32).load_in_8bit
    assert ModelArguments().quantization_config(torch.float32) is None


def test_a_no_grad_forward_leaves_the_stored_4bit_weights_alone(tmp_path):
    """bitsandbytes repacks 4-bit weights in place at a no-grad CPU forward on AVX512-BF16 machines (this one, when
    has_avx512bf16() says so): ZeRO-3's partitions would no longer match, and out_features=40 (not a multiple of 32)
    fails its assertion. The base keeps the stored layout."""
    tiny_model("llama", vocab_size=VOCAB, seed=0, intermediate_size=40).save_pretrained(tmp_path)
    quantized = _quantized(tmp_path)
    layers = quantized_linears(quantized)
    stored = {name: (layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()) for name, layer in layers.items()}
    quantized.eval()
    with torch.no_grad():
        quantized(batch(rows=2, length=9))
    for name, layer in layers.items():
        assert torch.equal(layer.weight.data, stored[name][0]), name
        assert torch.equal(layer.weight.quant_state.absmax, stored[name][1]), name


def test_load_base_replicates_a_quantized_base_on_one_process(base_dir):
    """The ZeRO-2 / one-rank path of load_base: the quantized base on this device, its unquantized weights copied
    out of the checkpoint's memory map, computing what the quantized model computes."""
    from adamix_ds.distributed.sharded_base import load_base

    config = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}
    args = ModelArguments(model_name_or_path=str(base_dir), quantization_bit=4)
    base = load_base(args, config, vocab_size=VOCAB, seed=0)
    assert not base.partitioned and len(quantized_linears(base.model)) == 14
    reference = _quantized(base_dir)
    ids = batch(rows=2, length=9)
    with torch.no_grad():
        torch.testing.assert_close(base.model.eval()(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)


def test_a_quantized_checkpoint_trains_mixtures_and_refuses_full(base_dir, tmp_path):
    """A checkpoint saved quantized (bitsandbytes' serialization, uint8 storage) loads quantized without
    --quantization_bit; --method full is refused for it before anything is loaded."""
    from adamix_ds.training.preflight import check_model

    _quantized(base_dir).save_pretrained(tmp_path)
    args = ModelArguments(model_name_or_path=str(tmp_path))
    with pytest.raises(ConfigError, match="is a quantized checkpoint"):
        check_model(args, MixtureConfig(method="full"))
    check_model(args, MixtureConfig(method="lora"))
    model = _from_source(args, torch.float32, VOCAB)
    keep_storage_layout(model)
    assert len(quantized_linears(model)) == 14 and base_numel(model) == base_numel(_quantized(base_dir))
    from adamix_ds.distributed.sharded_base import load_base

    replicated = load_base(args, {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}, VOCAB, seed=0)
    ids = batch(rows=2, length=9)
    with torch.no_grad():
        torch.testing.assert_close(replicated.model.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
