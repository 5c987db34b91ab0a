"""What the quality study runs: the base model, pretraining, task sizes, methods and seeds per preset.

The adaptation methods are sized to serve about the same number of parameters (LoRA rank 8 on the
query and value projections: 24,576 on the CPU base; see `served` in the results): AdaMix merges its
experts into one module of that size, the adapters' bottleneck is chosen to match, and the MoA
variants, which serve every expert and router, get rank-1 LoRA experts and a narrower adapter.
Full fine-tuning serves the whole base and is the reference, not a contender.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StudyMethod:
    name: str
    options: dict
    """Trainer options (launch/train.py flags without dashes)."""
    modes: tuple[str, ...] = ("model",)
    """How the fine-tuned model is served when scored: model (the exported model), merged or random."""


@dataclass(frozen=True)
class Preset:
    name: str
    model: dict
    """Llama config keywords of the base (vocab_size is the tokenizer's)."""
    vocab_size: int
    pretrain_steps: int
    pretrain_batch: int
    pretrain_ranks: int
    pretrain_lr: float
    seq_length: int
    sizes: dict
    """Synsets per split (train, dev, test) of each task."""
    finetune_steps: int
    finetune_batch: int
    seeds: tuple[int, ...]
    parallel_jobs: int
    """Fine-tuning jobs run side by side (each with cores / parallel_jobs threads)."""
    threads_per_job: int
    learning_rates: dict = field(default_factory=lambda: {"full": 3e-4, "default": 5e-3})
    """Per method name, else "default"; fixed before the study (a short LoRA probe on dev), not tuned per method."""
    finetune_deepspeed: str = "zero2.json"
    """Fine-tuning runs on one rank, where ZeRO-3's partitioning has nothing to shard; pretraining uses zero3.json."""
    eval_batch: int = 64
    max_new_tokens: dict = field(default_factory=lambda: {"supersense": 8, "definition": 32})


def study_methods(lora_r: int, adapter_size: int, moa_r: int, moa_adapter: dict, prompt_length: int) -> list[StudyMethod]:
    """The methods of the first table (its AdaMix-LoRA rows drew each expert independently, the default then)."""
    adamix_modes = ("merged", "random")
    return [
        StudyMethod("lora", {"method": "lora", "lora_r": lora_r}),
        StudyMethod("adamix-lora", {"method": "adamix-lora", "lora_r": lora_r, "expert_init": "independent"},
                    adamix_modes),
        StudyMethod("adamix-lora+consistency", {"method": "adamix-lora", "lora_r": lora_r, "expert_init": "independent",
                                                "consistency_weight": 1.0}, adamix_modes),
        StudyMethod("adapter", {"method": "adapter", "adapter_size": adapter_size}),
        StudyMethod("adamix-adapter", {"method": "adamix-adapter", "adapter_size": adapter_size}, adamix_modes),
        StudyMethod("moa-soft", {"method": "moa-soft", "lora_r": moa_r, "lora_alpha": moa_r,
                                 "adapter_size": moa_adapter["moa-soft"], "prompt_length": prompt_length}),
        StudyMethod("moa-sparse", {"method": "moa-sparse", "lora_r": moa_r, "lora_alpha": moa_r,
                                   "adapter_size": moa_adapter["moa-sparse"]}),
        StudyMethod("full", {"method": "full"}),
    ]


PRESETS = {
    "cpu": Preset(
        name="cpu",
        model=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3,
                   num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True),
        vocab_size=4096, pretrain_steps=500, pretrain_batch=16, pretrain_ranks=2, pretrain_lr=1e-3,
        seq_length=128, sizes={"train": 10000, "dev": 200, "test": 400},
        finetune_steps=600, finetune_batch=16, seeds=(0, 1, 2), parallel_jobs=2, threads_per_job=1,
    ),
    "gpu": Preset(
        name="gpu",
        model=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True),
        vocab_size=8192, pretrain_steps=600, pretrain_batch=64, pretrain_ranks=1, pretrain_lr=6e-4,
        seq_length=256, sizes={"train": 20000, "dev": 1000, "test": 2000},
        finetune_steps=600, finetune_batch=32, seeds=(0, 1, 2), parallel_jobs=4, threads_per_job=4,
        learning_rates={"full": 1e-4, "default": 2e-3},
    ),
    "smoke": Preset(
        name="smoke",
        model=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
        vocab_size=512, pretrain_steps=4, pretrain_batch=4, pretrain_ranks=1, pretrain_lr=1e-3,
        seq_length=64, sizes={"train": 48, "dev": 8, "test": 12},
        finetune_steps=3, finetune_batch=4, seeds=(0, 1), parallel_jobs=2, threads_per_job=1,
        eval_batch=8, max_new_tokens={"supersense": 4, "definition": 6},
    ),
}
"""cpu: within 60 minutes on 2 cores; gpu: within 20 minutes on one H100; smoke: the tests' end-to-end run."""

METHODS = {
    "cpu": study_methods(lora_r=8, adapter_size=16, moa_r=1, moa_adapter={"moa-soft": 4, "moa-sparse": 6},
                         prompt_length=4),
    "gpu": study_methods(lora_r=8, adapter_size=16, moa_r=1, moa_adapter={"moa-soft": 4, "moa-sparse": 6},
                         prompt_length=4),
    "smoke": study_methods(lora_r=4, adapter_size=8, moa_r=1, moa_adapter={"moa-soft": 2, "moa-sparse": 3},
                           prompt_length=2),
}
