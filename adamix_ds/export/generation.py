"""Generation from a merged model directory or from a mixture checkpoint in a chosen routing mode."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, HfArgumentParser

from ..arguments import ModelArguments
from ..config import EVAL_MODES, ConfigError
from ..data.labels import IGNORE_INDEX
from ..data.tokenizer import load_tokenizer
from ..data.validation import check_utf8, json_rows, require_text
from .mixture_checkpoint import CONFIG_NAME, load_mixtures


@dataclass
class GenerateArguments:
    model_path: str = field(metadata={"help": "A merged model directory (OUTPUT_DIR/merged/model), a mixture "
                                              "checkpoint (OUTPUT_DIR/checkpoints/step-N; needs --model_name_or_path), "
                                              "or any base --model_name_or_path takes (a GGUF file, "
                                              "smollm2:135m-instruct), to generate from the base itself."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompt text (repeatable)."})
    prompts_file: Optional[str] = field(default=None, metadata={"help": "A jsonl file with a 'prompt' field per line, "
                                                                        "or a 'messages' list per line (a chat "
                                                                        "ending on a user turn)."})
    chat: bool = field(default=False, metadata={"help": "Render each --prompt as a user turn with the tokenizer's chat "
                                                        "template (instruct models); 'messages' rows always are."})
    eval_mode: str = field(default="merged", metadata={"help": f"Routing of a mixture checkpoint: {', '.join(EVAL_MODES)}."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens to generate per prompt."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: greedy or sampling)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy/beam decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    top_k: int = field(default=50, metadata={"help": "Top-k sampling."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write prompt/completion jsonl here."})


def decoding_config(args: GenerateArguments, tokenizer) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def load_for_generation(model_args: ModelArguments, args: GenerateArguments):
    """(model, tokenizer, mixtures) in eval mode: a merged model (mixtures None), a routed method's export
    (base + mixture in one directory), base + a mixture checkpoint routed as args.eval_mode, or a base alone."""
    path = Path(args.model_path)
    mixtures = None
    if (path / "config.json").is_file():
        tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(path),
                                                  tokenizer_name_or_path=model_args.tokenizer_name_or_path))
        model = AutoModelForCausalLM.from_pretrained(path, **model_args.pretrained_options())
        if (path / CONFIG_NAME).is_file():
            # A routed method's export: the base model and its whole mixture (routers included) together.
            mixtures = load_mixtures(model, path)
    elif (path / CONFIG_NAME).is_file():
        if model_args.source.builtin:
            raise ConfigError("a mixture checkpoint needs --model_name_or_path: the base model it was trained on "
                              "(for a built-in base, generate from OUTPUT_DIR/merged/model instead)")
        tokenizer = load_tokenizer(model_args)
        model = model_args.source.load(**model_args.pretrained_options())
        mixtures = load_mixtures(model, path)
        mixtures.set_eval_mode(args.eval_mode)
    else:
        base = dataclasses.replace(model_args, model_name_or_path=args.model_path)
        if not base.source.is_gguf:
            raise ConfigError(f"--model_path {path}: neither a merged model (config.json), a mixture checkpoint "
                              f"({CONFIG_NAME}) nor a GGUF model")
        tokenizer = load_tokenizer(base)
        model = base.source.load(**base.pretrained_options())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if mixtures is not None:
        mixtures.to(device)  # the mixtures live outside the model's module tree
    return model, tokenizer, mixtures


@torch.no_grad()
def complete(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig, synced: bool = False) -> list[str]:
    """Decode each prompt (token ids) one at a time; `synced` for ZeRO-3 (every rank generates together)."""
    device = next(model.parameters()).device
    outputs = []
    for ids in prompt_ids:
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, synced_gpus=synced)
        outputs.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return outputs


@torch.no_grad()
def complete_batch(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig,
                   synced: bool = False) -> list[str]:
    """Decode prompts of any lengths together, left-padded (a decoder continues from the last position)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompt_ids)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, synced_gpus=synced)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def prompt_of(row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of a tokenized example: the prompt is everything before the first target."""
    labels = row["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels) // 2)
    first = max(first, 1)
    return row["input_ids"][:first], [t for t in labels[first:] if t != IGNORE_INDEX]


def read_prompts(path: str) -> list[str | list[dict]]:
    """The `prompt` (text) or `messages` (a chat) of each row of a jsonl file, checked as data files are: a bad row
    is refused in one line naming it."""
    file, option = Path(path), "--prompts_file"
    if not file.is_file():
        raise ConfigError(f"{option} {path}: file not found")
    check_utf8(file, option)
    prompts = []
    for where, row in json_rows(file, option):
        if "messages" in row:
            prompts.append(require_chat(row, where))
        else:
            require_text(row, "prompt", where)
            prompts.append(row["prompt"])
    return prompts


def require_chat(row: dict, where: str) -> list[dict]:
    """A conversation to continue: role/content turns that end on a user turn."""
    messages = row["messages"]
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                            and isinstance(m.get("content"), str) for m in messages)):
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} turns")
    if messages[-1]["role"] != "user":
        raise ConfigError(f"{where}: 'messages' must end on a user turn (the model writes the assistant's answer)")
    return messages


def prompt_ids(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt: plain text as the tokenizer encodes it, or a chat (a messages list, or with --chat a
    text as one user turn) rendered by the tokenizer's template up to the assistant's turn."""
    if isinstance(prompt, str) and not chat:
        return tokenizer(prompt)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat and 'messages' prompts need a chat template, and this tokenizer has none")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_main(model_args: ModelArguments, args: GenerateArguments) -> list[dict]:
    prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompts_file FILE")
    model, tokenizer, _ = load_for_generation(model_args, args)
    torch.manual_seed(args.seed)
    ids = [prompt_ids(tokenizer, p, args.chat) for p in prompts]
    completions = complete(model, tokenizer, ids, decoding_config(args, tokenizer))
    rows = [{("prompt" if isinstance(p, str) else "messages"): p, "completion": c} for p, c in zip(prompts, completions)]
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))
    if args.output_file:
        Path(args.output_file).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def parse_generate_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, GenerateArguments]:
    model_args, gen_args = HfArgumentParser((ModelArguments, GenerateArguments)).parse_args_into_dataclasses(args=argv)
    return model_args, gen_args
