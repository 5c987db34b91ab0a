"""The whole copy that samples and scoring generate from under ZeRO-3: the same logits in the same dtype, tied
weights tied, every buffer real (here on unpartitioned models, where gathering is a no-op; the 2-rank SmolLM2 run in
tests/launched/test_real_model.py checks it on a partitioned base against transformers' generate)."""

import pytest
import torch

from adamix_ds.builtin_models import tiny_model
from adamix_ds.distributed.sharded_base import whole_copy
from conftest import batch


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3", "gemma"])
def test_the_copy_computes_what_the_model_does_in_its_dtype(family):
    model = tiny_model(family, tie_word_embeddings=True).to(torch.bfloat16).eval()
    replica = whole_copy(model, torch.device("cpu"))
    assert {p.dtype for p in replica.parameters()} == {torch.bfloat16}
    assert replica.get_output_embeddings().weight is replica.get_input_embeddings().weight
    assert not [name for name, b in replica.named_buffers() if b.device.type == "meta"]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(replica.parameters(), model.parameters()))
    ids = batch(rows=2, length=7)
    with torch.no_grad():
        assert torch.equal(replica(ids).logits, model(ids).logits)
