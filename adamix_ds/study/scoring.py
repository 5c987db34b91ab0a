"""Scoring a fine-tuned model on a task split: greedy completions, then the task's metric.

supersense: accuracy of the first generated word against the lexicographer file name.
definition: corpus BLEU (sacrebleu, default 13a tokenisation) and mean ROUGE-L F1 (rouge-score, with
stemming), both 0-100.
Prompts are decoded in batches of equal token length, so no padding enters a forward and every
completion is the one an unbatched greedy decode gives.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from transformers import GenerationConfig


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


def score_split(model, tokenizer, task: str, path: Path, max_new_tokens: int, batch_size: int) -> tuple[dict, list]:
    """(metrics, rows with predictions) of one jsonl split."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    predictions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    metrics = METRICS[task](predictions, [r["completion"] for r in rows])
    return metrics, [{"key": r["key"], "prediction": p} for r, p in zip(rows, predictions)]
