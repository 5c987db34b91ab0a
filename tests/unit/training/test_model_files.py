"""What a model directory may hold: weights in safetensors only (a pickle can run code when it is loaded), and code
of its own only with --trust_remote_code. Both are refused in one line before anything is loaded."""

import json

import pytest
import torch

from adamix_ds import MixtureConfig
from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import tiny_config
from adamix_ds.config import ConfigError
from adamix_ds.training.preflight import check_model


def test_a_model_with_pickled_weights_only_is_refused(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"weights only in pickle files \(pytorch_model.bin\).*safetensors only"):
        check_model(ModelArguments(model_name_or_path=str(tmp_path)), MixtureConfig())
    (tmp_path / "model.safetensors").write_bytes(b"")  # beside safetensors the pickle is simply not read
    check_model(ModelArguments(model_name_or_path=str(tmp_path)), MixtureConfig())


def test_a_model_with_code_of_its_own_is_refused_without_trust_remote_code(tmp_path):
    marker = tmp_path / "the-code-ran"
    (tmp_path / "configuration_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n")
    config = tiny_config("llama").to_dict()
    config.update(model_type="custom-llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="runs only with --trust_remote_code"):
        check_model(ModelArguments(model_name_or_path=str(tmp_path)), MixtureConfig())
    assert not marker.exists()
