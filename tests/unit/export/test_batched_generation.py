"""Batched greedy decoding (left-padded prompts of different lengths) against decoding each prompt alone."""

import torch
from transformers import GenerationConfig

from adamix_ds.builtin_models import tiny_model
from adamix_ds.export.generation import complete, complete_batch


class IdsAsText:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_a_left_padded_batch_decodes_as_each_prompt_alone():
    model = tiny_model("llama", vocab_size=64, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 64, (n,), generator=generator).tolist() for n in (3, 7, 5, 1)]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
    alone = complete(model, IdsAsText(), prompts, config)
    assert complete_batch(model, IdsAsText(), prompts, config) == alone
    assert len(set(alone)) == 4 and all(len(text.split()) == 8 for text in alone)
