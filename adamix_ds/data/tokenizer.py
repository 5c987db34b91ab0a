"""Where the tokenizer comes from: a model or tokenizer directory, or a sentencepiece .model file."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..arguments import ModelArguments
from ..builtin_models import is_builtin
from ..config import ConfigError
from . import default_task

SENTENCEPIECE_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": "<pad>", "add_bos_token": True,
}
"""How a bare sentencepiece model is presented to transformers (ids 0-3: pad, bos, eos, unk)."""


def use_chat_template(tokenizer: PreTrainedTokenizerBase, path: str | None) -> None:
    """--chat_template: the tokenizer renders chat data with this file's template (and saves it with itself)."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--chat_template {path}: file not found")
    tokenizer.chat_template = file.read_text(encoding="utf-8")


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The model's own tokenizer (a GGUF file's included), another tokenizer directory, or a sentencepiece .model
    file; the end-of-sequence token pads where the tokenizer has no padding token.

    A built-in model (tiny:*, small:*) without --tokenizer_name_or_path gets the embedded default task's
    sentencepiece model, trained on its shipped text once and cached.
    """
    tokenizer = _read_tokenizer(model_args)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    name = model_args.tokenizer_name_or_path
    if name is None and not model_args.source.builtin:
        return model_args.source.load_tokenizer(model_args.trust_remote_code)
    source = default_task.tokenizer_model() if name is None or is_builtin(name) else name
    if not source.endswith(".model"):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    if not Path(source).is_file():
        raise ConfigError(f"--tokenizer_name_or_path {source}: file not found")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(SENTENCEPIECE_CONFIG))
        return AutoTokenizer.from_pretrained(tmp)
