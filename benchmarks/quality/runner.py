"""The quality study from raw Debian files to a results table, resumable stage by stage.

Stages (each skipped when its output exists): the documentation corpus and tokenizer, the WordNet task
files, the initial model, pretraining (`--method full`, ZeRO-3, `pretrain_ranks` ranks), one fine-tuning
job per (task, method, seed), `parallel_jobs` at a time, each scored on dev and test in every serving
mode, and the aggregate: results.json and results.md under the work directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from adamix_ds.distributed.collectives import free_port
from adamix_ds.training.checkpoints import find_resume_checkpoint
from adamix_ds.training.initial_model import write_initial_model

from . import pretraining, python_docs, wordnet_tasks
from .presets import Preset, StudyMethod
from .scoring import HEADLINE
from .update_norms import update_norms

logger = logging.getLogger("adamix_ds.study")
RUN_RECORDS = ("run.json", "scores.json")
"""What a finished run leaves that the tables read: the trainer's record (final and periodic dev loss, parameter
counts, step times) and the scores of its served models."""
KEPT_EXTRAS = ("timing.json", "predictions-*-test.jsonl", "update_norms.json")
"""Kept beside a run's records and restored with them where present: the run's training and scoring seconds, the
served test predictions (about 35 KB for a definition run), for the report's samples and any later paired analysis,
and a LoRA-type run's update norms (update_norms.py)."""
BENCHMARKS = Path(__file__).resolve().parent.parent
"""benchmarks/, where the study's package lives (its scoring processes import it from there)."""


@dataclass(frozen=True)
class Job:
    task: str
    method: StudyMethod
    seed: int
    steps: int | None = None
    """Fine-tuning steps (None: the preset's)."""
    train_size: int | None = None
    """Training synsets, the first of the training split (None: all of it)."""
    eval_steps: int = 0
    """Dev loss every this many steps during training (0: at the end only)."""

    @property
    def name(self) -> str:
        """The run's directory under runs/: the original table's jobs keep their names; variants add theirs."""
        variant = "".join(f"/{key}-{value}" for key, value in (("steps", self.steps), ("train", self.train_size))
                          if value is not None)
        return f"{self.task}/{self.method.name}{variant}/seed-{self.seed}"


def _run_seconds(timing: dict) -> float:
    return timing["train_s"] + timing["score_s"]


def _kept_files(run: Path) -> list[Path]:
    """A run's records and whichever of the extras it has: what --keep_runs copies out and back."""
    extras = [path for pattern in KEPT_EXTRAS for path in sorted(run.glob(pattern))]
    return [run / name for name in RUN_RECORDS] + extras


def _flags(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


class QualityStudy:
    def __init__(self, preset: Preset, methods: list[StudyMethod], work_dir: Path, data_dir: Path, train_script: Path,
                 tasks: tuple[str, ...] = wordnet_tasks.TASKS, docs_root: Path | None = None,
                 wordnet_dir: Path = Path("/usr/share/wordnet"), keep_runs: Path | None = None) -> None:
        self.preset, self.methods, self.tasks = preset, methods, tasks
        self.work_dir, self.data_dir, self.train_script = work_dir, data_dir, train_script
        self.docs_root, self.wordnet_dir = docs_root, wordnet_dir
        self.keep_runs = keep_runs
        """Where each finished run's records are copied (run.json, scores.json); a run found there is restored
        instead of run again, so a study can be committed run by run and resumed on another machine."""
        self.gpu = _has_gpu()
        self.timings: dict[str, float] = {}

    # Stages.
    def prepare_data(self) -> None:
        corpus_dir = self.data_dir / "python-docs"
        if not (corpus_dir / "validation.txt").is_file():
            logger.info("extracting the Python documentation's prose into %s", corpus_dir)
            python_docs.write_corpus(corpus_dir, self.docs_root)
        self.tokenizer = pretraining.train_tokenizer(corpus_dir / "train.txt", self.data_dir / "tokenizer",
                                                     self.preset.vocab_size)
        (self.work_dir / "pretrain-data").mkdir(parents=True, exist_ok=True)
        self.pretrain_files = {
            split: pretraining.text_rows(corpus_dir / f"{split}.txt", self.work_dir / "pretrain-data" / f"{split}.jsonl")
            for split in ("train", "validation")
        }
        self.task_files = wordnet_tasks.write_task_files(self.work_dir / "tasks", self.preset.sizes,
                                                         self.data_dir / "wordnet-splits.json", self.wordnet_dir)

    def pretrain(self) -> Path:
        p = self.preset
        out = self.work_dir / "pretrain"
        base = out / "merged" / "model"
        if (out / "run.json").is_file() and (base / "config.json").is_file():
            return base
        init = write_initial_model(self.work_dir / "initial-model", self.tokenizer, p.model, p.vocab_size, seed=0)
        options = {
            "model_name_or_path": init, "method": "full", "data_path": self.pretrain_files["train"],
            "eval_data_path": self.pretrain_files["validation"], "data_format": "text", "packing": "true",
            "max_seq_length": p.seq_length, "per_device_train_batch_size": p.pretrain_batch,
            "learning_rate": p.pretrain_lr, "warmup_steps": max(1, p.pretrain_steps // 20),
            "max_steps": p.pretrain_steps, "weight_decay": 0.01, "logging_steps": 20,
            "eval_steps": max(1, p.pretrain_steps // 4), "save_steps": 0, "num_samples": 2, "output_dir": out,
            "deepspeed": self._ds_config(),
        }
        self._launch(options, out / "train.log", ranks=p.pretrain_ranks, threads=max(1, os.cpu_count() // p.pretrain_ranks))
        return base

    def ready_base(self, base: Path) -> Path:
        """The base, ready for a run that must train: a study whose base is made on first need makes it here."""
        return base

    def jobs(self) -> list[Job]:
        return [Job(task, method, seed) for task in self.tasks for method in self.methods for seed in self.preset.seeds]

    def run_job(self, job: Job, base: Path) -> dict:
        p = self.preset
        out = self.work_dir / "runs" / job.name
        scores_path = out / "scores.json"
        if scores_path.is_file() and (out / "run.json").is_file():
            if not (out / "update_norms.json").is_file() and self._record_update_norms(out):
                self._keep(job, out)  # a run finished before the record existed, its checkpoint still here
            return json.loads(scores_path.read_text())
        if self._restore(job, out):
            logger.info("%s: restored from %s", job.name, self.keep_runs)
            return json.loads(scores_path.read_text())
        if out.exists():
            shutil.rmtree(out)  # an unfinished earlier attempt
        base = self.ready_base(base)
        files = self.task_files[job.task]
        train = files["train"] if job.train_size is None else self.train_subset(job.task, job.train_size)
        steps = job.steps or p.finetune_steps
        options = {
            "model_name_or_path": base, "data_path": train, "eval_data_path": files["dev"], "max_seq_length": 96,
            "per_device_train_batch_size": p.finetune_batch, "learning_rate": self.learning_rate(job.method),
            "warmup_steps": max(1, steps // 10), "max_steps": steps, "logging_steps": 25,
            "eval_steps": job.eval_steps, "save_steps": 0, "save_total_limit": 1, "num_samples": 0,
            "seed": job.seed, "output_dir": out, "deepspeed": self._ds_config(p.finetune_deepspeed),
            **job.method.options,
        }
        start = time.perf_counter()
        self._launch(options, out / "train.log", ranks=1, threads=p.threads_per_job)
        trained = time.perf_counter() - start
        command = [sys.executable, "-m", "quality.served_model", "--run_dir", str(out), "--base", str(base),
                   "--task", job.task, "--modes", ",".join(job.method.modes),
                   "--max_new_tokens", str(p.max_new_tokens[job.task]), "--batch_size", str(p.eval_batch),
                   "--split", f"dev={files['dev']}", "--split", f"test={files['test']}"]
        self._run(command, out / "score.log", threads=p.threads_per_job)
        scores = json.loads(scores_path.read_text())
        timing = {"train_s": trained, "score_s": time.perf_counter() - start - trained}
        (out / "timing.json").write_text(json.dumps(timing) + "\n")
        self._record_update_norms(out)
        self._keep(job, out)
        logger.info("%s: trained in %.0f s, scored in %.0f s: %s", job.name, timing["train_s"], timing["score_s"],
                    {k: round(v[HEADLINE[job.task]], 2) for k, v in scores.items()})
        return scores

    def run(self) -> dict:
        started = time.perf_counter()
        self.prepare_data()
        self.timings["data_s"] = time.perf_counter() - started
        base = self.pretrain()
        self.timings["pretrain_s"] = time.perf_counter() - started - self.timings["data_s"]
        jobs = self.jobs()
        logger.info("%d fine-tuning jobs, %d at a time", len(jobs), self.preset.parallel_jobs)
        done = iter(range(1, len(jobs) + 1))

        def run_and_count(job: Job) -> dict:
            scores = self.run_job(job, base)
            logger.info("%d of %d fine-tuning jobs done", next(done), len(jobs))
            return scores

        run_side_by_side(run_and_count, jobs, self.preset.parallel_jobs)
        self.timings["finetune_s"] = time.perf_counter() - started - self.timings["data_s"] - self.timings["pretrain_s"]
        self.timings["total_s"] = time.perf_counter() - started
        return self.aggregate(jobs)

    # Helpers.
    @staticmethod
    def _record_update_norms(out: Path) -> bool:
        """Write update_norms.json from the run's final checkpoint; False where it has none or no LoRA pairs."""
        checkpoint = find_resume_checkpoint(out, "auto")
        norms = update_norms(checkpoint) if checkpoint is not None else None
        if norms is not None:
            (out / "update_norms.json").write_text(json.dumps(norms) + "\n")
        return norms is not None

    def _restore(self, job: Job, out: Path) -> bool:
        kept = None if self.keep_runs is None else self.keep_runs / job.name
        if kept is None or not all((kept / name).is_file() for name in RUN_RECORDS):
            return False
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for path in _kept_files(kept):
            shutil.copy2(path, out / path.name)
        return True

    def _keep(self, job: Job, out: Path) -> None:
        if self.keep_runs is None:
            return
        kept = self.keep_runs / job.name
        kept.mkdir(parents=True, exist_ok=True)
        for path in _kept_files(out):
            shutil.copy2(path, kept / path.name)

    def learning_rate(self, method: StudyMethod) -> float:
        """The method's own learning_rate option, else the preset's for its name or --method, else the default."""
        rates = self.preset.learning_rates
        return method.options.get("learning_rate",
                                  rates.get(method.name, rates.get(method.options["method"], rates["default"])))

    def train_subset(self, task: str, size: int) -> Path:
        """The first `size` synsets of the training split (its order is already a seeded shuffle)."""
        path = self.work_dir / "tasks" / task / f"train-{size}.jsonl"
        if not path.is_file():
            lines = self.task_files[task]["train"].read_text().splitlines(keepends=True)
            if len(lines) < size:
                raise ValueError(f"{task}: {size} training synsets asked, the split has {len(lines)}")
            path.write_text("".join(lines[:size]))
        return path

    def _ds_config(self, name: str = "zero3.json") -> Path:
        return self.train_script.parent.parent / "ds_configs" / name

    def _launch(self, options: dict, log: Path, ranks: int, threads: int) -> None:
        script = str(self.train_script)
        if ranks > 1:
            command = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script]
        else:
            command = [sys.executable, script]
        self._run(command + _flags(options), log, threads)

    def _run(self, command: list[str], log: Path, threads: int) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
        if not self.gpu:
            env["DS_ACCELERATOR"] = "cpu"
        with open(log, "w") as handle:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
        if result.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"{' '.join(command[:4])} ... failed with exit code {result.returncode}; "
                               f"log {log}:\n{tail}")

    def rows(self, seeds_of_one_config: list[Job]) -> list[dict]:
        """One row per serving mode of jobs that differ only by seed: each metric's mean, deviation and values."""
        first = seeds_of_one_config[0]
        runs = [self.work_dir / "runs" / j.name for j in seeds_of_one_config]
        scores = [json.loads((r / "scores.json").read_text()) for r in runs]
        records = [json.loads((r / "run.json").read_text()) for r in runs]
        rows = []
        for mode in first.method.modes:
            row = {"task": first.task, "method": first.method.name, "serving": mode,
                   "seeds": [j.seed for j in seeds_of_one_config], "steps": first.steps or self.preset.finetune_steps,
                   "train_size": first.train_size or self.preset.sizes["train"],
                   "served_parameters": records[0]["parameters"]["served"],
                   "trained_parameters": records[0]["parameters"]["trained"], "options": first.method.options}
            row["dev_loss"] = _stat([_final_loss(r["final_eval"], mode) for r in records])
            timings = [r / "timing.json" for r in runs]
            if all(t.is_file() for t in timings):
                row["run_seconds"] = sum(_run_seconds(json.loads(t.read_text())) for t in timings)
            spread = [final_expert_divergence(r["history"]) for r in records]
            if None not in spread:
                row["expert_divergence"] = _stat(spread)
            norms = [r / "update_norms.json" for r in runs]
            if all(n.is_file() for n in norms):
                norms = [json.loads(n.read_text()) for n in norms]
                row["update_norm"] = _stat([n["served"] for n in norms])
                row["expert_update_norm"] = _stat([n["experts"] for n in norms])
            for split in ("dev", "test"):
                for metric in scores[0][f"{mode}/{split}"]:
                    if metric in ("examples", "seconds"):
                        continue
                    row[f"{split}/{metric}"] = _stat([s[f"{mode}/{split}"][metric] for s in scores])
            rows.append(row)
        return rows

    def aggregate(self, jobs: list[Job]) -> dict:
        rows = []
        for task in self.tasks:
            for method in self.methods:
                rows += self.rows([j for j in jobs if j.task == task and j.method == method])
        results = {
            "preset": asdict(self.preset), "machine": _machine(), "timings_s": self.timings,
            "pretraining": self._pretraining_summary(), "baselines": self._baselines(), "rows": rows,
        }
        (self.work_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (self.work_dir / "results.md").write_text(markdown_table(results))
        return results

    def _pretraining_summary(self) -> dict:
        record = json.loads((self.work_dir / "pretrain" / "run.json").read_text())
        evals = [h for h in record["history"] if "eval/model/loss" in h]
        return {"parameters": record["parameters"]["base"], "steps": record["final_step"],
                "eval_loss": [(h["step"], h["eval/model/loss"]) for h in evals]}

    def _baselines(self) -> dict:
        """Majority-class accuracy of supersense (the most frequent training label, scored on test)."""
        if "supersense" not in self.tasks:
            return {}
        read = lambda split: [json.loads(line)["completion"].strip()
                              for line in self.task_files["supersense"][split].read_text().splitlines()]
        train, test = read("train"), read("test")
        majority = max(set(train), key=train.count)
        return {"supersense_majority": {"label": majority,
                                        "test_accuracy": 100.0 * test.count(majority) / len(test)}}


def run_side_by_side(function, items: list, workers: int) -> list:
    """function(item) for every item, `workers` at a time; results in item order.

    The first failure cancels the items not yet started (those running finish) and is raised, so a
    broken setup is reported after one round of jobs, not after the whole study.
    """
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
    return [f.result() for f in futures]


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def final_expert_divergence(history: list[dict]) -> float | None:
    """The experts' spread at the end of training: the mean over layers of the last logged experts/divergence (mean
    pairwise cosine distance of each layer's experts; 0 where they are identical); None without experts."""
    last = next((h for h in reversed(history) if any(k.startswith("experts/divergence/") for k in h)), None)
    if last is None:
        return None
    values = [v for k, v in last.items() if k.startswith("experts/divergence/")]
    return sum(values) / len(values)


def _final_loss(final_eval: dict, mode: str) -> float:
    """The trainer's token-mean dev loss for a serving mode (a method without routing reports one mode)."""
    if f"eval/{mode}/loss" in final_eval:
        return final_eval[f"eval/{mode}/loss"]
    losses = [v for k, v in final_eval.items() if k.endswith("/loss")]
    if len(losses) != 1:
        raise ValueError(f"no single dev loss for serving mode {mode!r} in {sorted(final_eval)}")
    return losses[0]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"1 x {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores ({socket.gethostname()})"


def _cell(stat: dict | None) -> str:
    return "" if stat is None else f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def paired_difference(row: dict, reference: dict, key: str) -> dict:
    """Mean and standard deviation over seeds of row - reference, seed by seed (same seeds, same data order)."""
    if row["seeds"] != reference["seeds"]:
        raise ValueError(f"{row['method']} and {reference['method']} ran different seeds")
    return _stat([a - b for a, b in zip(row[key]["values"], reference[key]["values"])])


def _signed(stat: dict) -> str:
    return f"{stat['mean']:+.1f} ± {stat['std']:.1f}"


def markdown_table(results: dict) -> str:
    p = results["preset"]
    lines = [f"Preset `{p['name']}` on {results['machine']}: base {results['pretraining']['parameters']:,} parameters, "
             f"{len(p['seeds'])} seeds, mean ± standard deviation. Total {results['timings_s'].get('total_s', 0) / 60:.0f} min.",
             ""]
    tasks = sorted({r["task"] for r in results["rows"]}, key=list(wordnet_tasks.TASKS).index)
    for task in tasks:
        rows = [r for r in results["rows"] if r["task"] == task]
        metrics = [k.split("/", 1)[1] for k in rows[0] if k.startswith("test/")]
        headline = HEADLINE[task]
        lora = next((r for r in rows if r["method"] == "lora"), None)
        head = (["method", "serving", "served params", "dev loss"] + [f"dev {m}" for m in metrics]
                + [f"test {m}" for m in metrics] + ([f"test {headline} - LoRA"] if lora else []))
        lines += [f"**{task}** ({p['sizes']['train']} train / {p['sizes']['dev']} dev / {p['sizes']['test']} test synsets)",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["method"], r["serving"], f"{r['served_parameters']:,}",
                     f"{r['dev_loss']['mean']:.3f} ± {r['dev_loss']['std']:.3f}"]
            cells += [_cell(r.get(f"dev/{m}")) for m in metrics] + [_cell(r.get(f"test/{m}")) for m in metrics]
            if lora:
                cells.append("" if r is lora else _signed(paired_difference(r, lora, f"test/{headline}")))
            lines.append("| " + " | ".join(cells) + " |")
        contenders = [r for r in rows if r["method"] != "full" and f"dev/{headline}" in r]
        if contenders:
            best = max(contenders, key=lambda r: r[f"dev/{headline}"]["mean"])
            lines += ["", f"Chosen on dev ({headline}): {best['method']} ({best['serving']}), "
                          f"test {headline} {_cell(best[f'test/{headline}'])}."]
        lines.append("")
    curve = ", ".join(f"{loss:.2f} (step {step})" for step, loss in results["pretraining"]["eval_loss"])
    lines.append(f"Pretraining eval loss on held-out documentation paragraphs: {curve}.")
    majority = results["baselines"].get("supersense_majority")
    if majority:
        lines.append(f"Supersense majority class ({majority['label']}): {majority['test_accuracy']:.1f}% of test.")
    return "\n".join(lines) + "\n"


def run_study(preset: Preset, methods: list[StudyMethod], work_dir: Path, data_dir: Path, train_script: Path,
              seeds: tuple[int, ...] | None = None, **kwargs) -> dict:
    if seeds:
        preset = replace(preset, seeds=tuple(seeds))
    return QualityStudy(preset, methods, work_dir, data_dir, train_script, **kwargs).run()
