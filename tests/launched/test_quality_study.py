"""The quality study's pieces against hand-written inputs, and the whole recipe end to end on the smoke preset."""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quality import python_docs, wordnet_tasks
from quality.scoring import definition_scores, greedy_completions, most_likely_completions, supersense_accuracy
from quality.wordnet import LEXICOGRAPHER_FILES, WORDNET_DIR, parse_line, read_synsets

REPO = Path(__file__).resolve().parents[2]
DOCS = Path(sorted(glob.glob(python_docs.PYTHON_DOCS_GLOB) or ["/missing"])[-1])
needs_wordnet = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(),
                                   reason="WordNet database not installed (apt-get install wordnet-base)")

NOUN = ("02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 ~ 01322604 n 0000 "
        "| a member of the genus Canis; \"the dog barked all night\"  \n")
SATELLITE = ("00013160 00 s 02 alive(p) 0 live 1 001 & 00012689 a 0000 | possessing life; "
             "\"the happiest person alive\"; \"the nerve is still alive\"  \n")
VERB = ("01166351 34 v 01 eat 0 002 @ 01157517 v 0000 ~ 01167640 v 0000 02 + 08 00 + 11 00 "
        "| take in solid food; \"She was eating a banana\"  \n")


def test_parse_line_reads_words_supersense_and_definition_without_examples():
    dog = parse_line(NOUN)
    assert (dog.key, dog.supersense, dog.pos) == ("n02084071", "noun.animal", "noun")
    assert dog.words == ("dog", "domestic dog", "Canis familiaris")
    assert dog.definition == "a member of the genus Canis"
    alive = parse_line(SATELLITE)
    assert (alive.key, alive.supersense, alive.pos, alive.words) == ("a00013160", "adj.all", "adjective",
                                                                      ("alive", "live"))
    assert alive.definition == "possessing life"
    eat = parse_line(VERB)
    assert (eat.supersense, eat.words, eat.definition) == ("verb.consumption", ("eat",), "take in solid food")


@needs_wordnet
def test_lexicographer_names_agree_with_each_files_part_of_speech():
    synsets = read_synsets()
    assert len(LEXICOGRAPHER_FILES) == 45 and len(synsets) == 117659  # WordNet 3.0
    prefix = {"noun": "noun.", "verb": "verb.", "adverb": "adv.", "adjective": "adj."}
    assert all(s.supersense.startswith(prefix[s.pos]) for s in synsets)
    assert {s.supersense for s in synsets} == set(LEXICOGRAPHER_FILES)


def _fake_wordnet(directory: Path, nouns: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for pos in ("noun", "verb", "adj", "adv"):
        (directory / f"data.{pos}").write_text("  1 licence line\n")
    lines = [f"{i:08d} 05 n 01 animal{i} 0 000 | animal number {i}; \"an example\"  \n" for i in range(nouns)]
    (directory / "data.noun").write_text("  1 licence line\n" + "".join(lines))
    (directory / "data.verb").write_text(VERB)
    return directory


def test_splits_partition_the_synsets_once_and_are_reused(tmp_path):
    wordnet = _fake_wordnet(tmp_path / "wn", nouns=30)
    splits_file = tmp_path / "splits.json"
    held_out = {"dev": 5, "test": 7}
    splits = wordnet_tasks.synset_splits(splits_file, wordnet, held_out)
    keys = [k for split in splits.values() for k in split]
    assert len(keys) == len(set(keys)) == 31 and (len(splits["dev"]), len(splits["test"])) == (5, 7)
    assert "v01166351" in keys
    splits_file.write_text(splits_file.read_text().replace(splits["dev"][0], "kept-from-file"))
    assert wordnet_tasks.synset_splits(splits_file, wordnet, held_out)["dev"][0] == "kept-from-file"
    (wordnet / "data.verb").write_text(VERB.replace("eat", "drink"))
    with pytest.raises(ValueError, match="other WordNet files"):
        wordnet_tasks.synset_splits(splits_file, wordnet, held_out)


def test_task_files_take_split_prefixes_and_share_synsets_across_tasks(tmp_path, monkeypatch):
    wordnet = _fake_wordnet(tmp_path / "wn", nouns=40)
    monkeypatch.setattr(wordnet_tasks, "HELD_OUT", {"dev": 6, "test": 6})
    files = wordnet_tasks.write_task_files(tmp_path / "tasks", {"train": 10, "dev": 3, "test": 4},
                                           tmp_path / "splits.json", wordnet)
    read = lambda task, split: [json.loads(x) for x in files[task][split].read_text().splitlines()]
    for split, size in (("train", 10), ("dev", 3), ("test", 4)):
        assert [r["key"] for r in read("supersense", split)] == [r["key"] for r in read("definition", split)]
        assert len(read("supersense", split)) == size
    train_keys = {r["key"] for r in read("supersense", "train")}
    assert train_keys.isdisjoint(r["key"] for r in read("supersense", "test") + read("supersense", "dev"))
    first = read("definition", "train")[0]
    number = int(first["key"][1:])
    assert first == {"prompt": f"Word: animal{number} (noun) | Definition:", "completion": f" animal number {number}",
                     "key": first["key"]}
    label = read("supersense", "train")[0]
    assert label["completion"] == " noun.animal" and label["prompt"].endswith(" | Supersense:")


def test_page_paragraphs_keep_the_main_prose_only():
    html = """<html><body><div class="sphinxsidebar"><p>Navigation sidebar text here</p></div>
    <div class="body" role="main"><h1>Encoding  <code>json</code> documents quickly<a class="headerlink" href="#">¶</a></h1>
    <p>Encode   and decode
    JSON documents , easily.</p><pre>import json; json.dumps(1)  # code stays out</pre>
    <ul><li><p>A list item with a paragraph.</p></li><li>A bare list item here.</li></ul>
    <p>Too short.</p></div></body></html>"""
    assert python_docs.page_paragraphs(html) == [
        "Encoding json documents quickly", "Encode and decode JSON documents, easily.",
        "A list item with a paragraph.", "A bare list item here.",
    ]


def test_metrics_against_hand_computation():
    assert supersense_accuracy(["noun.animal extra", "verb.body", ""], [" noun.animal", " noun.body", " adj.all"]) \
        == {"accuracy": pytest.approx(100 / 3)}
    same = definition_scores(["the cat sat on the mat"], [" the cat sat on the mat"])
    assert same == {"bleu": pytest.approx(100.0), "rougeL": pytest.approx(100.0)}
    # LCS("cat dog bird fish", "cat bird fish horse") = cat bird fish: P = R = 3/4.
    assert definition_scores(["cat dog bird fish"], ["cat bird fish horse"])["rougeL"] == pytest.approx(75.0)
    assert definition_scores(["zebra"], ["cat bird fish horse"]) == {"bleu": 0.0, "rougeL": 0.0}


def test_batched_greedy_completions_equal_one_prompt_at_a_time(workspace):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from adamix_ds.arguments import ModelArguments
    from adamix_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(workspace.base)))
    model = AutoModelForCausalLM.from_pretrained(workspace.base).eval()
    prompts = ["name[Aromi] food[Chinese] =>", "name[Zizzi] =>", "name[Aromi] food[French] =>", "area[riverside]",
               "name[Zizzi] food[Indian] area[city centre] =>"]
    batched = greedy_completions(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    config = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    for prompt, text in zip(prompts, batched):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        assert text == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_most_likely_completion_by_the_models_own_loss(workspace):
    from transformers import AutoModelForCausalLM

    from adamix_ds.arguments import ModelArguments
    from adamix_ds.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(workspace.base)))
    model = AutoModelForCausalLM.from_pretrained(workspace.base).eval()
    with torch.no_grad():  # sharper next-token distributions, so that the prompt decides the winner
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(10)
    prompts = ["name[Aromi] food[Chinese] =>", "name[Zizzi] =>", "area[riverside] near[Yippee Noodle Bar] =>",
               "eatType[pub] =>", "food[Italian] priceRange[high] =>"]
    candidates = [" pub", " restaurant", " Chinese", " Italian", " riverside"]  # 1 to 8 tokens each
    expected = []
    for prompt in prompts:
        totals = []
        for candidate in candidates:
            p = tokenizer(prompt)["input_ids"]
            c = tokenizer(candidate, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss
            totals.append(-loss.item() * len(c))  # mean over the completion's tokens -> their sum
        expected.append(candidates[max(range(len(candidates)), key=totals.__getitem__)])
    assert len(set(expected)) > 1
    for batch_size in (1, 7, 64):
        assert most_likely_completions(model, tokenizer, prompts, candidates, batch_size) == expected
    assert most_likely_completions(model, tokenizer, prompts, candidates[::-1], 7) == expected


@needs_wordnet
@pytest.mark.skipif(not DOCS.is_dir(), reason="Python documentation not installed (apt-get install python3-doc)")
def test_smoke_study_pretrains_fine_tunes_and_scores_every_mode(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in sorted((DOCS / "tutorial").glob("*.html")):
        shutil.copy(page, docs)
    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "benchmarks" / "quality_study.py"), "--preset", "smoke",
               "--work_dir", str(work), "--data_dir", str(tmp_path / "data"), "--docs_root", str(docs),
               "--methods", "adamix-lora,adapter,moa-sparse"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    pretrain = json.loads((work / "pretrain" / "run.json").read_text())
    assert pretrain["arguments"]["mixture"]["method"] == "full"
    assert pretrain["base_partition"]["zero_stage"] == 3
    results = json.loads((work / "results.json").read_text())
    rows = {(r["task"], r["method"], r["serving"]): r for r in results["rows"]}
    assert set(rows) == {(t, m, s) for t in ("supersense", "definition")
                         for m, s in (("adamix-lora", "merged"), ("adamix-lora", "random"), ("adapter", "model"),
                                      ("moa-sparse", "model"))}
    # Served LoRA: rank 4 on q (64 -> 64) and v (64 -> 64) in 2 layers, whatever the number of experts.
    assert rows["supersense", "adamix-lora", "merged"]["served_parameters"] == 4 * (64 + 64) * 2 * 2
    # Adapter after each FFN: down 64 -> 8 and up 8 -> 64 with biases, in 2 layers.
    assert rows["supersense", "adapter", "model"]["served_parameters"] == (64 * 8 + 8 + 8 * 64 + 64) * 2
    # Scores recomputed from the written predictions and the task files.
    test_rows = [json.loads(x) for x in (work / "tasks" / "supersense" / "test.jsonl").read_text().splitlines()]
    for stat, seed in enumerate((0, 1)):
        run = work / "runs" / "supersense" / "adamix-lora" / f"seed-{seed}"
        predictions = [json.loads(x) for x in (run / "predictions-random-test.jsonl").read_text().splitlines()]
        assert [p["key"] for p in predictions] == [r["key"] for r in test_rows]
        hits = sum(bool(p["prediction"].split()) and p["prediction"].split()[0] == r["completion"].strip()
                   for p, r in zip(predictions, test_rows))
        assert rows["supersense", "adamix-lora", "random"]["test/accuracy"]["values"][stat] == \
            pytest.approx(100 * hits / len(test_rows))
        ranked_hits = sum(p["ranked"] == r["completion"].strip() for p, r in zip(predictions, test_rows))
        assert all(p["ranked"] in LEXICOGRAPHER_FILES for p in predictions)
        assert rows["supersense", "adamix-lora", "random"]["test/ranked_accuracy"]["values"][stat] == \
            pytest.approx(100 * ranked_hits / len(test_rows))
    assert "| adamix-lora | random |" in (work / "results.md").read_text()

    # The extension's budget part on the same base and data: the sweep chooses on dev with the reference's
    # regularisers, the budgets reuse the sweep's runs. (The other parts reuse its machinery: `_rows_of` per method.)
    before = {p.parent for p in (work / "runs").rglob("scores.json")}
    done = subprocess.run(command[:-2] + ["--parts", "budget"], capture_output=True, text=True, check=False,
                          timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    budget = json.loads((work / "parts" / "budget.json").read_text())
    sweep = budget["sweep"]
    assert len(sweep["rows"]) == 2 + 2 * 2  # LoRA: 2 rates; AdaMix: 2 rates x 2 weights, served merged
    adamix_sweep = [r for r in sweep["rows"] if r["serving"] == "merged"]
    best = max(adamix_sweep, key=lambda r: (r["dev/accuracy"]["mean"], -r["dev_loss"]["mean"]))
    assert sweep["chosen"]["adamix-lora"]["name"] == best["method"]
    chosen_run = work / "runs" / "supersense" / best["method"] / "steps-2" / "seed-0"
    arguments = json.loads((chosen_run / "run.json").read_text())["arguments"]
    assert arguments["train"]["label_smoothing_factor"] == 0.1 and arguments["train"]["weight_decay"] == 0.01
    assert arguments["mixture"]["expert_init"] == "identical" and arguments["mixture"]["lora_dropout"] == 0.1
    assert json.loads((chosen_run / "run.json").read_text())["deepspeed_config"]["gradient_clipping"] == 0
    assert {(r["method"].split("(")[0], r["serving"], r["steps"]) for r in budget["rows"]} == {
        (m, s, steps) for m, s in (("lora", "model"), ("adamix-lora", "merged"))
        for steps in (2, 4)}
    rows = {(r["method"].split("(")[0], r["serving"], r["steps"]): r for r in budget["rows"]}
    for steps in (2, 4):
        adamix, lora = rows["adamix-lora", "merged", steps], rows["lora", "model", steps]
        differences = [a - b for a, b in zip(adamix["test/accuracy"]["values"], lora["test/accuracy"]["values"])]
        assert budget["comparisons"]["equal_steps"][str(steps)]["values"] == pytest.approx(differences)
    new = {p.parent for p in (work / "runs").rglob("scores.json")} - before
    assert len(new) == 6 + 6  # sweep 2 + 4, budgets 2 x 2 x 2 less the 2 sweep runs they share
    assert (work / "parts" / "budget.png").stat().st_size > 0
    assert "Each at its best dev budget" in (work / "parts" / "results.md").read_text()


def test_table_pairs_each_method_with_lora_seed_by_seed_and_chooses_on_dev():
    from quality.runner import markdown_table

    def stat(values):
        return {"mean": sum(values) / len(values), "values": values, "std": 0.0}

    def row(method, serving, dev, test):
        return {"task": "supersense", "method": method, "serving": serving, "seeds": [0, 1, 2],
                "served_parameters": 100, "dev_loss": stat([1.0, 1.0, 1.0]),
                "dev/accuracy": stat(dev), "test/accuracy": stat(test)}

    results = {
        "preset": {"name": "t", "seeds": [0, 1, 2], "sizes": {"train": 9, "dev": 3, "test": 3}},
        "machine": "m", "timings_s": {"total_s": 60}, "pretraining": {"parameters": 1000, "eval_loss": [(4, 2.5)]},
        "baselines": {},
        "rows": [row("lora", "model", [10, 20, 30], [10, 20, 30]),
                 row("adamix-lora", "merged", [11, 21, 31], [13, 21, 32]),
                 row("full", "model", [90, 90, 90], [90, 90, 90])],
    }
    table = markdown_table(results)
    # adamix - lora per seed: 3, 1, 2 -> mean 2, sample standard deviation 1.
    assert "| adamix-lora | merged | 100 | 1.000 ± 0.000 | 21.0 ± 0.0 | 22.0 ± 0.0 | +2.0 ± 1.0 |" in table
    assert "| full | model | 100 | 1.000 ± 0.000 | 90.0 ± 0.0 | 90.0 ± 0.0 | +70.0 ± 10.0 |" in table
    # Full fine-tuning is the reference, never the choice; the choice is made on dev.
    assert "Chosen on dev (accuracy): adamix-lora (merged), test accuracy 22.0 ± 0.0." in table


def test_a_failing_job_cancels_the_jobs_not_yet_started(monkeypatch):
    import threading
    from concurrent.futures import Future

    from quality.runner import run_side_by_side

    assert run_side_by_side(lambda item: item * 10, [3, 0, 2], workers=2) == [30, 0, 20]

    items, started, lock, all_cancelled = list(range(8)), [], threading.Lock(), threading.Event()
    cancel, cancels = Future.cancel, []

    def counted_cancel(future):
        cancelled = cancel(future)
        cancels.append(future)
        if len(cancels) == len(items):
            all_cancelled.set()
        return cancelled

    monkeypatch.setattr(Future, "cancel", counted_cancel)

    def job(item):
        with lock:
            started.append(item)
        if item == 1:
            raise RuntimeError("job 1 failed")
        assert all_cancelled.wait(timeout=10), "the failure cancelled nothing"  # job 0 runs until the cancel
        return item

    with pytest.raises(RuntimeError, match="job 1 failed"):
        run_side_by_side(job, items, workers=2)
    # Jobs 0 and 1 start together; at most the one a worker picked up before the cancel follows.
    assert sorted(started[:2]) == [0, 1] and len(started) <= 3


@needs_wordnet
def test_smollm2_smoke_study_sweeps_and_compares_two_seeds_on_the_packaged_model(smollm2_file, tmp_path):
    """The real-model preset end to end on the packaged SmolLM2 (a few steps): the base is read from its GGUF once,
    the sweep picks among its candidates on dev loss, the supersense part pairs AdaMix with LoRA seed by seed, and a
    second invocation reuses every finished run; a third, in a fresh work directory, restores every run from the
    records kept with --keep_runs (a study committed run by run and resumed on another machine) without converting
    the base."""
    import hashlib

    work, kept = tmp_path / "work", tmp_path / "kept"
    command = [sys.executable, str(REPO / "benchmarks" / "quality_study.py"), "--preset", "smollm2-smoke",
               "--parts", "sweep,supersense", "--work_dir", str(work), "--data_dir", str(tmp_path / "data"),
               "--keep_runs", str(kept)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    sweep = json.loads((work / "parts" / "sweep.json").read_text())
    assert sweep["base"]["sha256"] == hashlib.sha256(smollm2_file.read_bytes()).hexdigest()
    assert [r["method"] for r in sweep["rows"]] == ["lora(lr=0.0004)", "adamix-lora(lr=0.0004,cw=1,M=4)"]
    assert sweep["chosen"]["adamix-lora"]["options"]["expert_init"] == "identical"
    # The experts' spread at the end (identical at the start): AdaMix's runs only.
    assert "expert_divergence" not in sweep["rows"][0] and sweep["rows"][1]["expert_divergence"]["mean"] > 0
    # LoRA r 4 on q (576 -> 576) and v (576 -> 192) in 30 layers, whatever the number of experts.
    assert {r["served_parameters"] for r in sweep["rows"]} == {4 * (576 + 576 + 576 + 192) * 30}
    # Five test definitions per chosen method, matched to the test synsets by key (AdaMix served merged).
    test = [json.loads(line) for line in (work / "tasks" / "definition" / "test.jsonl").read_text().splitlines()][:5]
    samples = sweep["samples"]
    assert samples["references"] == [t["completion"].strip() for t in test]
    assert list(samples["definitions"]) == ["lora(lr=0.0004)", "adamix-lora(lr=0.0004,cw=1,M=4)"]
    for method, mode in zip(samples["definitions"], ("model", "merged")):
        run = work / "runs" / "definition" / method / f"steps-{sweep['steps']}" / "seed-0"
        served = run / f"predictions-{mode}-test.jsonl"
        predicted = {p["key"]: p["prediction"].strip() for p in map(json.loads, served.read_text().splitlines())}
        assert samples["definitions"][method] == [predicted[t["key"]] for t in test]
    assert "| prompt | reference | lora(lr=0.0004) |" in (work / "parts" / "results.md").read_text()
    timings = [json.loads(p.read_text()) for p in (work / "runs").rglob("timing.json")]
    assert len(timings) == 6 and all(t["train_s"] > 0 and t["score_s"] > 0 for t in timings)
    lora_dir = work / "runs" / "definition" / "lora(lr=0.0004)"
    lora_runs = [json.loads(p.read_text()) for p in lora_dir.rglob("timing.json")]
    assert sweep["rows"][0]["run_seconds"] == pytest.approx(sum(t["train_s"] + t["score_s"] for t in lora_runs))
    supersense = json.loads((work / "parts" / "supersense.json").read_text())
    lora, adamix = supersense["rows"]
    assert lora["seeds"] == adamix["seeds"] == [0, 1]
    differences = [a - b for a, b in zip(adamix["test/accuracy"]["values"], lora["test/accuracy"]["values"])]
    assert supersense["difference"]["values"] == pytest.approx(differences)
    assert "| lora(lr=0.0004) | supersense |" in (work / "parts" / "results.md").read_text()

    logs = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("train.log")}
    assert len(logs) == 6
    again = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("train.log")} == logs

    assert sorted(p.parent.relative_to(kept) for p in kept.rglob("scores.json")) == sorted(
        p.parent.relative_to(work / "runs") for p in logs)
    elsewhere = tmp_path / "elsewhere"
    command[command.index(str(work))] = str(elsewhere)
    restored = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]
    assert not list((elsewhere / "runs").rglob("train.log"))
    assert not (elsewhere / "base").exists()  # nothing trained, so the GGUF was never converted
    again = json.loads((elsewhere / "parts" / "supersense.json").read_text())
    assert again["rows"] == supersense["rows"]
    assert json.loads((elsewhere / "parts" / "sweep.json").read_text())["samples"] == samples  # kept predictions


def test_smollm2_budget_runs_seed_by_seed_and_pairs_adamix_with_lora(tmp_path):
    """The real-model budget part with a stand-in for training: every budget of a seed runs before the next seed
    starts (a study stopped part-way has whole seeds), the ladders are the preset's (LoRA 25/50/100 steps on 8,000
    synsets and 62/125/250 on 1,000; AdaMix adds four times the longest, which LoRA runs as a control), and the
    comparisons pair AdaMix with LoRA seed by seed, at equal steps (the control's too) and each at its lowest dev loss
    of its ladder (LoRA's control left out, however low)."""
    from types import SimpleNamespace

    from quality.real_model import REAL_PRESETS, RealModelParts, plot_budget

    preset, settings = REAL_PRESETS["smollm2"]
    ran = []

    def score(job):  # AdaMix is worse by 0.01 per seed number at equal steps, and better at its longest budget
        adamix = job.method.name.startswith("adamix")
        return 20 + job.steps / 100 + (0.5 * adamix if job.steps in (400, 1000) else -0.01 * job.seed * adamix)

    def run_job(job, base):
        ran.append(job)
        out = tmp_path / "runs" / job.name
        out.mkdir(parents=True)
        steps = sorted({*range(0, job.steps, job.eval_steps), job.steps})
        curve = [{"step": s, "eval/merged/loss": 4 - s / 1000 - job.seed / 10} for s in steps]
        (out / "run.json").write_text(json.dumps({"history": curve}))

    def rows(jobs):
        values = [score(j) for j in jobs]
        return [{"method": jobs[0].method.name, "steps": jobs[0].steps, "seeds": [j.seed for j in jobs],
                 "dev_loss": {"values": [-v for v in values], "mean": -sum(values) / len(values), "std": 0.0},
                 "dev/rougeL": {"mean": sum(values) / len(values), "std": 0.0},
                 "test/rougeL": {"values": values, "mean": sum(values) / len(values)}}]

    study = SimpleNamespace(preset=preset, work_dir=tmp_path, run_job=run_job, rows=rows)
    parts = RealModelParts(study, settings)
    parts.base = tmp_path
    lora, adamix = parts.lora(3.2e-3), parts.adamix(3.2e-3, 1.0)
    parts._sweep = {"chosen": {"lora": lora, "adamix-lora": adamix}}
    result = parts.part_budget()

    assert [j.seed for j in ran] == sorted(j.seed for j in ran)
    per_seed = {(j.method.name, j.steps, j.train_size) for j in ran if j.seed == 0}
    assert per_seed == {*((lora.name, s, None) for s in (25, 50, 100, 400)),
                        *((adamix.name, s, None) for s in (25, 50, 100, 400)),
                        *((lora.name, s, 1000) for s in (62, 125, 250, 1000)),
                        *((adamix.name, s, 1000) for s in (62, 125, 250, 1000))}
    assert len(ran) == 3 * len(per_seed)
    full = result["comparisons"][f"full/{adamix.name}"]
    assert full["equal_steps"][50]["values"] == pytest.approx([0.0, -0.01, -0.02])
    assert full["equal_steps"][400]["values"] == pytest.approx([0.5, 0.5, 0.5])
    assert full["equal_steps_dev_loss"][50]["values"] == pytest.approx([0.0, 0.01, 0.02])
    controls = [r["control"] for r in result["rows"] if r["method"] == lora.name]
    assert controls == [False, False, False, True] * 2
    assert (full["best_dev"]["lora_steps"], full["best_dev"]["adamix_steps"]) == (100, 400)
    assert full["best_dev"]["difference"]["values"] == pytest.approx([3.5, 3.5, 3.5])  # 24.5 - 21.0 on every seed
    curve = result["dev_loss_curves"][f"{adamix.name}/small/1000"][1]
    assert curve[0] == (0, pytest.approx(3.9)) and curve[-1] == (1000, pytest.approx(2.9))
    assert plot_budget(result, tmp_path / "budget.png").stat().st_size > 0


def test_update_norms_of_merged_experts_and_of_lora_against_hand_computed_values(tmp_path):
    """The budget part's mechanism measurement on hand-written checkpoints: two A experts [1, 0] and [0, 1] under a
    shared B = [[2]] (alpha / r = 1) serve the merge 2 [0.5, 0.5] = [1, 1], norm sqrt(2), while each expert's update
    [2, 0] or [0, 2] has norm 2; a second insertion point adds in quadrature; LoRA (one expert) has both the same;
    full fine-tuning and routed methods have none."""
    from safetensors.torch import save_file

    from adamix_ds.config import MixtureConfig
    from quality.update_norms import update_norms

    def checkpoint(name, method, experts, tensors, alpha=1.0):
        path = tmp_path / name
        path.mkdir()
        config = MixtureConfig(method=method, num_experts=experts, lora_r=1, lora_alpha=alpha)
        (path / "mixture_config.json").write_text(json.dumps({"format_version": 1, "config": config.to_dict(),
                                                               "seed": 0, "targets": []}))
        save_file(tensors, str(path / "mixtures.safetensors"))
        return path

    adamix = checkpoint("adamix", "adamix-lora", 2, {
        "l0.q.lora_A": torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]), "l0.q.lora_B": torch.tensor([[[2.0]]]),
        "l1.q.lora_A": torch.tensor([[[3.0, 0.0]], [[3.0, 0.0]]]), "l1.q.lora_B": torch.tensor([[[1.0]]])})
    assert update_norms(adamix) == pytest.approx({"served": (2 + 9) ** 0.5, "experts": (4 + 9) ** 0.5})
    lora = checkpoint("lora", "lora", 1, {"l0.v.lora_A": torch.tensor([[[3.0, 4.0]]]),
                                          "l0.v.lora_B": torch.tensor([[[1.0], [0.0]]])}, alpha=2.0)
    assert update_norms(lora) == pytest.approx({"served": 10.0, "experts": 10.0})  # 2 * [[3, 4], [0, 0]]
    assert update_norms(checkpoint("soft", "moa-soft", None, {"x": torch.zeros(1)})) is None
    full = tmp_path / "full"
    full.mkdir()
    assert update_norms(full) is None


def test_adapter_part_runs_each_adapter_method_as_the_table_did_and_with_the_references_init(tmp_path):
    """The extension's adapter part (in-process, training stood in for): the first table's adapter methods as they
    were, then each with every weight drawn as the reference draws them (`--adapter_init bert`), nothing else
    changed."""
    from types import SimpleNamespace

    from quality.parts import SETTINGS, ExtendedStudy
    from quality.presets import METHODS, PRESETS

    study = SimpleNamespace(preset=PRESETS["smoke"], methods=METHODS["smoke"], work_dir=tmp_path)
    parts = ExtendedStudy(study, SETTINGS["smoke"], lora_rank=4)
    ran = []
    parts._rows_of = lambda method: ran.append(method) or [{"method": method.name}]
    rows = parts.part_adapter()["rows"]
    table = {m.name: m for m in METHODS["smoke"] if m.name in ("adapter", "adamix-adapter")}
    assert [r["method"] for r in rows] == ["adapter", "adamix-adapter",
                                           "adapter(bert-init)", "adamix-adapter(bert-init)"]
    for method in ran:
        name = method.name.removesuffix("(bert-init)")
        expected = {**table[name].options, **({"adapter_init": "bert"} if method.name != name else {})}
        assert method.options == expected and method.modes == table[name].modes
