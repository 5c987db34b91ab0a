"""From raw examples to token ids and labels, once per node: formats, loss masks, truncation, packing.

Formats:
- text: every token counts (optionally packed into blocks of max_seq_length);
- prompt_completion: loss on the completion tokens only;
- chat: a `messages` list rendered with the tokenizer's chat template; loss on assistant turns only.

Tokenization runs on each node's local rank 0 into a cache directory keyed by a fingerprint of the
data, the tokenizer and the options; the other ranks wait and read the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from .. import distributed
from ..arguments import DataArguments
from ..config import ConfigError
from . import default_task
from .labels import IGNORE_INDEX
from .sources import read_examples

logger = logging.getLogger(__name__)
CACHE_VERSION = 2


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str, **options) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as error:  # the template's own errors (jinja2's, or raise_exception in the template)
        raise ConfigError(f"{where}: the chat template cannot render this conversation ({type(error).__name__}: "
                          f"{error})") from None


def _chat_example(tokenizer: PreTrainedTokenizerBase, messages: list[dict], where: str) -> tuple[list, list]:
    """Token ids of the rendered conversation; labels on the tokens that overlap an assistant turn's characters
    (its content and the template's end-of-turn text)."""
    text = _render(tokenizer, messages, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], where)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError(f"{where}: the chat template does not render conversations prefix by prefix; "
                              "assistant turns cannot be located")
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(begin < end and stop > start for start, end in spans) else IGNORE_INDEX
        for token, (begin, stop) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]
    return encoded["input_ids"], labels


def _encoder(tokenizer: PreTrainedTokenizerBase, fmt: str, path: str):
    eos = tokenizer.eos_token_id

    def encode(batch, indices):
        ids, labels = [], []
        if fmt == "text":
            for text in batch["text"]:
                tokens = tokenizer(text)["input_ids"] + [eos]
                ids.append(tokens)
                labels.append(list(tokens))
        elif fmt == "prompt_completion":
            for prompt, completion in zip(batch["prompt"], batch["completion"]):
                p = tokenizer(prompt)["input_ids"]
                c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos]
                ids.append(p + c)
                labels.append([IGNORE_INDEX] * len(p) + c)
        else:
            for row, messages in zip(indices, batch["messages"]):
                if isinstance(messages, str):  # JSON files: the messages as their JSON text (data/sources.py)
                    messages = json.loads(messages)
                i, l = _chat_example(tokenizer, messages, f"{path}: row {row + 1}")
                ids.append(i)
                labels.append(l)
        return {"input_ids": ids, "labels": labels}

    return encode


def _limit(ds: datasets.Dataset, max_len: int, drop_long: bool, packing: bool, fmt: str) -> datasets.Dataset:
    """Truncate (or drop) examples longer than max_len and report how many; or pack text into blocks."""
    if packing:
        if fmt != "text":
            raise ConfigError(f"--packing applies to the text format, not {fmt}")

        def pack(batch):
            flat = [t for row in batch["input_ids"] for t in row]
            blocks = [flat[i: i + max_len] for i in range(0, len(flat) - max_len + 1, max_len)]
            return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

        return ds.map(pack, batched=True, remove_columns=ds.column_names, desc="packing")
    lengths = ds["input_ids"]
    long = sum(len(row) > max_len for row in lengths)
    if long:
        action = "dropped (--drop_long)" if drop_long else "truncated"
        logger.info("%d of %d examples are longer than --max_seq_length %d and were %s", long, len(ds), max_len,
                    action)
    if drop_long:
        return ds.filter(lambda row: len(row["input_ids"]) <= max_len, desc="dropping long examples")
    return ds.map(lambda row: {"input_ids": row["input_ids"][:max_len], "labels": row["labels"][:max_len]},
                  desc="truncating")


def _add_target_counts(ds: datasets.Dataset, path: str) -> datasets.Dataset:
    ds = ds.map(lambda row: {"targets": sum(label != IGNORE_INDEX for label in row["labels"][1:])},
                desc="counting targets")
    ds = ds.filter(lambda row: row["targets"] > 0, desc="dropping examples without targets")
    if len(ds) == 0:
        raise ConfigError(f"{path}: no example has a target token left after tokenization and length limits")
    return ds


def fingerprint(path: str, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments) -> str:
    """Changes whenever the data, the tokenizer or an option that shapes the tokens changes."""
    h = hashlib.sha256()
    local = Path(path)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    for file in files:
        if file.exists():
            h.update(str(file.relative_to(local) if local.is_dir() else file.name).encode())
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(path.encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    special = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
               getattr(tokenizer, "chat_template", None)]
    options = [data_args.data_format, data_args.max_seq_length, data_args.drop_long, data_args.packing, CACHE_VERSION]
    h.update(json.dumps([special, options]).encode())
    return h.hexdigest()[:24]


def cache_root() -> Path:
    base = os.environ.get("ADAMIX_DS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adamix_ds"
    return Path(base) / "tokenized"


def _tokenize_into(target: Path, path: str, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> None:
    raw, fmt = read_examples(path, data_args.data_format)
    if fmt == "chat" and not tokenizer.chat_template:
        raise ConfigError(f"{path}: chat data (a 'messages' column) needs a chat template, and this tokenizer has none; "
                          "pass --chat_template PATH (a Jinja template file, as transformers' chat templates are "
                          "written) or use a tokenizer that has one")
    ds = raw.map(_encoder(tokenizer, fmt, path), batched=True, with_indices=True,
                 remove_columns=raw.column_names, desc=f"tokenizing {Path(path).name}")
    ds = _limit(ds, data_args.max_seq_length, data_args.drop_long, data_args.packing, fmt)
    ds = _add_target_counts(ds, path)
    tmp = target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}")
    ds.save_to_disk(str(tmp))
    (tmp / "COMPLETE").write_text(path + "\n")
    # On a disk shared by several nodes, each node's first rank may get here; every copy is identical,
    # and all ranks read only after the job-wide barrier, so the first complete one is kept.
    if not (target / "COMPLETE").is_file():
        shutil.rmtree(target, ignore_errors=True)  # an interrupted earlier attempt
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "COMPLETE").is_file():
                raise
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("tokenized %s: %d examples (cache %s)", path, len(ds), target)


def tokenize(path: str, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Read, check and tokenize `path` (every rank calls this; only each node's local rank 0 does the work)."""
    key = fingerprint(path, tokenizer, data_args)
    target = cache_root() / key
    failure, report = None, None
    if distributed.local_rank() == 0 and not (target / "COMPLETE").is_file():
        try:
            _tokenize_into(target, path, data_args, tokenizer)
        except ConfigError as error:
            failure, report = error, ("config", str(error))
        except BaseException as error:  # re-raised after the exchange below, so no rank waits for ever
            failure, report = error, ("other", f"{path}: tokenization failed on rank {distributed.rank()} ({error!r})")
    # Every rank learns the first failure (this also waits for every node's tokenization): bad data ends every
    # rank with the same line; anything else is raised as what it is on its rank and reported on the others.
    failed = next((r for r in distributed.all_gather_objects(report) if r is not None), None)
    if failure is not None:
        raise failure
    if failed is not None:
        kind, message = failed
        raise ConfigError(message) if kind == "config" else RuntimeError(message)
    if not (target / "COMPLETE").is_file():
        raise ConfigError(f"{path}: tokenization on this node's first rank did not finish (cache {target})")
    return datasets.load_from_disk(str(target))


def train_eval_datasets(data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int):
    """(train, eval or None): eval from --eval_data_path or a seeded --eval_split_ratio hold-out."""
    if data_args.data_path is None:
        logger.info("no --data_path: the embedded default task (%s)", default_task.RESOURCES)
        data_args.data_path = default_task.data_file("train")
        if data_args.eval_data_path is None and not data_args.eval_split_ratio:
            data_args.eval_data_path = default_task.data_file("validation")
    train = tokenize(data_args.data_path, data_args, tokenizer)
    if data_args.eval_data_path:
        held_out = tokenize(data_args.eval_data_path, data_args, tokenizer)
    elif data_args.eval_split_ratio > 0:
        split = train.train_test_split(test_size=data_args.eval_split_ratio, seed=seed)
        train, held_out = split["train"], split["test"]
    else:
        return train, None
    if data_args.max_eval_samples is not None:
        held_out = held_out.select(range(min(data_args.max_eval_samples, len(held_out))))
    return train, held_out
