"""The packaged SmolLM2-135M-Instruct through the real entry point: 2 ZeRO-3 CPU ranks fine-tune it from its GGUF file
by name on chat data; the merged export loads in transformers, and PEFT puts the merged adapter onto the dequantized
base with the merged model's logits; generation applies the model's own chat template."""

import copy
import json

import torch
from launching import run_entry, run_record
from transformers import AutoModelForCausalLM, AutoTokenizer

from adamix_ds.arguments import ModelArguments
from adamix_ds.builtin_models import SMOLLM2
from adamix_ds.data.default_task import data_file
from adamix_ds.export.generation import GenerateArguments, generate_main

CHATML_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
"""SmolLM2's template for one user turn, written out by hand."""


def chat_rows(split: str, count: int) -> str:
    lines = open(data_file(split), encoding="utf-8").read().splitlines()[:count]
    rows = []
    for line in lines:
        row = json.loads(line)
        rows.append({"messages": [{"role": "user", "content": f"Describe this restaurant: {row['prompt'][:-3]}"},
                                  {"role": "assistant", "content": row["completion"].strip()}]})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_smollm2_by_name_on_two_zero3_ranks_exports_what_transformers_and_peft_load(smollm2, tmp_path):
    import peft

    base, gguf_tokenizer = smollm2
    (tmp_path / "train.jsonl").write_text(chat_rows("train", 32), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text(chat_rows("validation", 8), encoding="utf-8")
    out = tmp_path / "out"
    run_entry("train.py", ["--model_name_or_path", SMOLLM2, "--data_path", str(tmp_path / "train.jsonl"),
                           "--eval_data_path", str(tmp_path / "eval.jsonl"), "--max_eval_samples", "4",
                           "--method", "adamix-lora", "--num_experts", "2", "--max_steps", "3",
                           "--per_device_train_batch_size", "2", "--learning_rate", "5e-3", "--max_seq_length", "96",
                           "--eval_steps", "3", "--num_samples", "1", "--sample_max_new_tokens", "3",
                           "--output_dir", str(out)], ranks=2, timeout=600)
    record = run_record(out)
    losses = [h["eval/merged/loss"] for h in record["history"] if "eval/merged/loss" in h]
    assert len(losses) == 2 and losses[1] < losses[0], losses

    merged = AutoModelForCausalLM.from_pretrained(out / "merged" / "model", dtype=torch.float32).eval()
    served = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / "merged" / "adapter")).eval()
    ids = torch.tensor([gguf_tokenizer(CHATML_PROMPT.format("Describe this restaurant: name[Aromi]"),
                                       add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got, before = served(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)
    assert (got - before).abs().max() > 1e-2  # the merged adapter changed the model

    saved = AutoTokenizer.from_pretrained(out / "merged" / "model")
    assert saved.chat_template == gguf_tokenizer.chat_template and saved.eos_token == "<|im_end|>"
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    # The sample, generated on 2 ZeRO-3 ranks from a whole copy of the base with the mixtures' hooks on it, is what
    # transformers' greedy generate gives on the merged export in one process.
    first = json.loads(chat_rows("validation", 1))["messages"][0]["content"]
    prompt = gguf_tokenizer(CHATML_PROMPT.format(first), add_special_tokens=False, return_tensors="pt")["input_ids"]
    greedy = merged.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=gguf_tokenizer.eos_token_id)
    assert sample["generated"] == gguf_tokenizer.decode(greedy[0, prompt.shape[1]:], skip_special_tokens=True)
    assert sample["prompt"].startswith("system\nYou are a helpful AI assistant named SmolLM")
    assert sample["prompt"].endswith("Describe this restaurant: name[The Twenty Two], eatType[pub], food[Italian], "
                                     "priceRange[less than £20], customer rating[3 out of 5], area[city centre], "
                                     "familyFriendly[yes], near[Yippee Noodle Bar]\nassistant\n")

    question = "Describe this restaurant: name[Aromi], eatType[pub], area[riverside]"
    rows = generate_main(ModelArguments(), GenerateArguments(model_path=str(out / "merged" / "model"), chat=True,
                                                             prompt=[question], max_new_tokens=8))
    prompt = gguf_tokenizer(CHATML_PROMPT.format(question), add_special_tokens=False, return_tensors="pt")["input_ids"]
    greedy = merged.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=gguf_tokenizer.eos_token_id)
    expected = [{"prompt": question, "completion": gguf_tokenizer.decode(greedy[0, prompt.shape[1]:],
                                                                        skip_special_tokens=True)}]
    assert rows == expected
    # The mixture checkpoint on the GGUF base, routed as merged, generates what the merged export does.
    checkpoint = out / "checkpoints" / "step-3"
    rows = generate_main(ModelArguments(model_name_or_path=SMOLLM2),
                         GenerateArguments(model_path=str(checkpoint), chat=True, prompt=[question], max_new_tokens=8))
    assert rows == expected
