"""Training data: files read with `datasets`, tokenized once, served as deterministic, resumable batches.

The order of examples is a function of (seed, epoch) and the position a function of the step, so
every rank knows which rows it owns at any step without communication, and a resumed run continues
at the exact example where it stopped.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from . import default_task, distributed
from .arguments import DataArguments, ModelArguments
from .config import ConfigError
from .consistency import IGNORE_INDEX
from .ds_config import BatchPlan
from .tiny_models import is_builtin

logger = logging.getLogger(__name__)
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
FORMATS = ("auto", "text", "prompt_completion")


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, another tokenizer directory, or a sentencepiece .model file.

    A built-in model (tiny:*, small:*) without --tokenizer_name_or_path gets the embedded default task's
    sentencepiece model, trained on its shipped text once and cached.
    """
    source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    if is_builtin(source):
        source = default_task.tokenizer_model()
    if source.endswith(".model"):
        if not Path(source).is_file():
            raise ConfigError(f"--tokenizer_name_or_path {source}: file not found")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(source, Path(tmp) / "tokenizer.model")
            (Path(tmp) / "tokenizer_config.json").write_text(
                '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", '
                '"unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": true}'
            )
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read(path: str) -> datasets.Dataset:
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"--data_path {path}: file not found")
    loader = LOADERS.get(file.suffix)
    if loader is None:
        raise ConfigError(f"--data_path {path}: unknown file type {file.suffix!r}; use one of {', '.join(LOADERS)}")
    return datasets.load_dataset(loader, data_files=str(file), split="train")


def _detect_format(ds: datasets.Dataset, requested: str, path: str) -> str:
    columns = set(ds.column_names)
    if requested not in FORMATS:
        raise ConfigError(f"--data_format={requested!r}: use one of {', '.join(FORMATS)}")
    if requested == "auto":
        requested = "prompt_completion" if {"prompt", "completion"} <= columns else "text"
    needed = {"text": {"text"}, "prompt_completion": {"prompt", "completion"}}[requested]
    if not needed <= columns:
        raise ConfigError(f"{path}: format {requested} needs columns {sorted(needed)}; found {sorted(columns)}")
    return requested


def _tokenize(tokenizer: PreTrainedTokenizerBase, fmt: str, max_len: int):
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids, labels = [], []
        if fmt == "text":
            for text in batch["text"]:
                tokens = (tokenizer(text)["input_ids"] + [eos])[:max_len]
                ids.append(tokens)
                labels.append(list(tokens))
        else:
            for prompt, completion in zip(batch["prompt"], batch["completion"]):
                p = tokenizer(prompt)["input_ids"]
                c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
                tokens = (p + c)[:max_len]
                ids.append(tokens)
                labels.append(([IGNORE_INDEX] * len(p) + c)[:max_len])
        targets = [sum(label != IGNORE_INDEX for label in row[1:]) for row in labels]
        return {"input_ids": ids, "labels": labels, "targets": targets}

    return encode


def tokenized_dataset(path: str, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Tokenize on rank 0 first (filling the datasets cache); the other ranks then read the cache."""
    ds = _read(path)
    fmt = _detect_format(ds, data_args.data_format, path)
    encode = _tokenize(tokenizer, fmt, data_args.max_seq_length)

    def run():
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenizing {Path(path).name}")

    if distributed.is_main():
        out = run()
        distributed.barrier()
    else:
        distributed.barrier()
        out = run()
    out = out.filter(lambda row: row["targets"] > 0)
    if len(out) == 0:
        raise ConfigError(f"{path}: no example has a target token after tokenization")
    return out


def train_eval_datasets(data_args: DataArguments, tokenizer, seed: int):
    """(train, eval or None): eval from --eval_data_path or a seeded --eval_split_ratio hold-out."""
    if data_args.data_path is None:
        logger.info("no --data_path: the embedded default task (%s)", default_task.RESOURCES)
        data_args.data_path = default_task.data_file("train")
        if data_args.eval_data_path is None and not data_args.eval_split_ratio:
            data_args.eval_data_path = default_task.data_file("validation")
    train = tokenized_dataset(data_args.data_path, data_args, tokenizer)
    if data_args.eval_data_path:
        return train, tokenized_dataset(data_args.eval_data_path, data_args, tokenizer)
    if data_args.eval_split_ratio > 0:
        split = train.train_test_split(test_size=data_args.eval_split_ratio, seed=seed)
        return split["train"], split["test"]
    return train, None


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids, attention_mask and labels (-100 on padding)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class StepSampler:
    """Which rows each rank's micro-batch holds at each step: a seeded permutation per epoch.

    Step s of epoch e = s // steps_per_epoch takes the next global batch of that epoch's permutation;
    micro-batch m of rank r takes rows [(m * world + r) * micro, ... + micro) of it. The incomplete
    last global batch of an epoch is dropped.
    """

    num_examples: int
    plan: BatchPlan
    seed: int
    _epoch_order: tuple = field(default=(-1, None), repr=False)

    def __post_init__(self) -> None:
        if self.num_examples < self.plan.global_batch:
            raise ConfigError(
                f"{self.num_examples} training examples are fewer than one global batch of {self.plan.global_batch}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.plan.global_batch

    def order(self, epoch: int) -> torch.Tensor:
        if self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_order = (epoch, torch.randperm(self.num_examples, generator=generator))
        return self._epoch_order[1]

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        start = index * self.plan.global_batch + (micro * self.plan.world_size + rank) * self.plan.micro_batch
        return order[start : start + self.plan.micro_batch].tolist()
