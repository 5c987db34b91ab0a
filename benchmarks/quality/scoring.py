"""Scoring a fine-tuned model on a task split: greedy completions, then the task's metric.

supersense: accuracy of the first generated word against the lexicographer file name, and ranked
accuracy: the supersense whose completion is most likely after the prompt, among all 45.
definition: corpus BLEU (sacrebleu, default 13a tokenisation) and mean ROUGE-L F1 (rouge-score, with
stemming), both 0-100.
Prompts are decoded in batches of equal token length, so no padding enters a forward and every
completion is the one an unbatched greedy decode gives.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import GenerationConfig

from .wordnet import LEXICOGRAPHER_FILES


def supersense_accuracy(predictions: list[str], references: list[str]) -> dict:
    hits = sum(p.split()[0] == r.strip() if p.split() else False for p, r in zip(predictions, references))
    return {"accuracy": 100.0 * hits / max(len(references), 1)}


def definition_scores(predictions: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = [p.strip().split("\n")[0] for p in predictions]
    references = [r.strip() for r in references]
    bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu": bleu, "rougeL": 100.0 * sum(rouge) / max(len(rouge), 1)}


METRICS = {"supersense": supersense_accuracy, "definition": definition_scores}
HEADLINE = {"supersense": "accuracy", "definition": "rougeL"}


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    device = next(model.parameters()).device
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(ids):
        by_length[len(row)].append(i)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    out: list[str] = [""] * len(prompts)
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            input_ids = torch.tensor([ids[i] for i in chunk], device=device)
            generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       generation_config=config)
            for i, row in zip(chunk, generated[:, length:]):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


@torch.no_grad()
def most_likely_completions(model, tokenizer, prompts: list[str], candidates: list[str], batch_size: int,
                            router=None) -> list[str]:
    """For each prompt, the candidate completion with the highest summed log-likelihood, tokenised as the
    trainer tokenises a prompt_completion example (prompt, then the completion without special tokens, then
    EOS). Classification by likelihood over a closed set: a misspelt or unfinished label, which greedy
    decoding can produce, cannot lose an example. With an AdaMix router in random mode, every candidate of a
    prompt is scored with the same experts (keyed by the prompt's index)."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in candidates]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(candidates))]
    scores = torch.empty(len(prompts), len(candidates), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [prompt_ids[i] + completion_ids[j] for i, j in chunk]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        # Row r's completion token k sits at position len(prompt) + k and is predicted at the position before.
        longest = max(len(completion_ids[j]) for _, j in chunk)
        positions = torch.zeros(len(rows), longest, dtype=torch.long)
        targets = torch.zeros(len(rows), longest, dtype=torch.long)
        counted = torch.zeros(len(rows), longest, dtype=torch.bool)
        for r, (i, j) in enumerate(chunk):
            n = len(completion_ids[j])
            positions[r, :n] = torch.arange(len(prompt_ids[i]) - 1, len(prompt_ids[i]) - 1 + n)
            targets[r, :n], counted[r, :n] = torch.tensor(completion_ids[j]), True
        keyed = router.keyed_rows([i for i, _ in chunk]) if router is not None else contextlib.nullcontext()
        with keyed:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        predicting = logits[torch.arange(len(rows), device=device)[:, None], positions.to(device)]
        token_log_probs = torch.log_softmax(predicting.float(), dim=-1).gather(-1, targets.to(device)[..., None])
        sums = token_log_probs[..., 0].masked_fill(~counted.to(device), 0.0).sum(dim=-1).double().cpu()
        for r, (i, j) in enumerate(chunk):
            scores[i, j] = sums[r]
    return [candidates[k] for k in scores.argmax(dim=-1).tolist()]


def score_split(model, tokenizer, task: str, path: Path, max_new_tokens: int, batch_size: int,
                router=None) -> tuple[dict, list]:
    """(metrics, rows with predictions) of one jsonl split."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    prompts, references = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    predictions = greedy_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    metrics = METRICS[task](predictions, references)
    scored = [{"key": r["key"], "prediction": p} for r, p in zip(rows, predictions)]
    if task == "supersense":
        ranked = most_likely_completions(model, tokenizer, prompts, [" " + s for s in LEXICOGRAPHER_FILES],
                                         batch_size, router)
        metrics["ranked_accuracy"] = supersense_accuracy(ranked, references)["accuracy"]
        for row, choice in zip(scored, ranked):
            row["ranked"] = choice.strip()
    return metrics, scored
