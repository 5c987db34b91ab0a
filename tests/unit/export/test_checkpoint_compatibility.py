"""Mixture checkpoints written by an earlier release still load and give the same outputs.

tests/fixtures/checkpoints_v1/ was written by the code of commit 48a7084 (before the package was split into
subpackages): a tiny Llama base (its weights and config stored beside, so the fixture does not depend on how
transformers initialises a model), four mixture checkpoints with perturbed weights (AdaMix-LoRA, AdaMix-adapter
sharing the down side, moa-soft with every expert, molora), and the logits that code computed for a fixed batch:
in eval mode, and for the AdaMix methods also with keyed random routing and with the training routes of step 5
(one pass, and two passes as the consistency loss runs them). Only the public API is used here, so the test
also pins `from adamix_ds import ...` and the checkpoint format.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from adamix_ds import MixtureConfig, load_mixtures

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "checkpoints_v1"
METHODS = ("adamix-lora", "adamix-adapter", "moa-soft", "molora")


def _base():
    config = LlamaConfig.from_json_file(FIXTURES / "tiny_llama_config.json")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(load_file(FIXTURES / "tiny_llama_base.safetensors"), strict=True)
    return model.requires_grad_(False)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_of_the_earlier_layout_loads_with_the_same_outputs(method):
    directory = FIXTURES / method
    saved = json.loads((directory / "mixture_config.json").read_text())
    model = _base()
    mixtures = load_mixtures(model, directory, expected=MixtureConfig.from_dict(saved["config"]))
    expected = load_file(directory / "expected_outputs.safetensors")
    ids, mask = expected.pop("input_ids"), expected.pop("attention_mask")
    outputs = {}
    with torch.no_grad():
        model.eval()
        outputs["eval"] = model(input_ids=ids, attention_mask=mask).logits
        if method.startswith("adamix-"):
            router = mixtures.router
            router.set_eval_mode("random")
            with router.keyed_rows([3, 1, 4, 1]):
                outputs["eval_random_keyed"] = model(input_ids=ids, attention_mask=mask).logits
            router.set_eval_mode("merged")
            model.train()
            router.step = 5
            outputs["train_step5"] = model(input_ids=ids, attention_mask=mask).logits
            with router.use_passes(0, 1):
                outputs["train_step5_two_passes"] = model(input_ids=ids, attention_mask=mask).logits
    assert sorted(outputs) == sorted(expected)
    for name, logits in expected.items():
        torch.testing.assert_close(outputs[name], logits, rtol=0, atol=1e-5, msg=f"{method} {name}")
    assert not torch.allclose(outputs["eval"], _base()(input_ids=ids, attention_mask=mask).logits, atol=1e-3), \
        "the mixture must change the base's outputs, or the comparison proves nothing"
