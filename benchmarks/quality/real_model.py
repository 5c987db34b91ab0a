"""The study on a real pretrained LLM: does AdaMix-LoRA, trained the way its reference trains it, beat LoRA on
SmolLM2-135M-Instruct, and in which regime?

There is no pretraining stage: the base is the packaged SmolLM2 (`smollm2:135m-instruct`), whose GGUF file's digest
is recorded. It is read from GGUF once and written to the work directory as safetensors (the same weights,
tests/unit/test_model_source.py), so each run's two processes load it in a second instead of dequantizing again. The tasks are the study's WordNet tasks on its synset splits. LoRA and AdaMix-LoRA both take the
reference's regularisers (parts.REFERENCE_REGULARISERS); AdaMix its reference init (identical A experts, shared up
side). Budgets are in epochs of the training set; AdaMix's ladder reaches four times LoRA's longest, as the
reference gives it four times LoRA's epochs, and LoRA also runs that longest budget as a control, so that AdaMix's
longest run has a LoRA run of equal steps beside it. Dev chooses, test reports. Parts (`--parts`, each resumable run
by run):

sweep       first seed, definition task, full training set, LoRA's middle budget: every method's learning rate
            from one ladder, then AdaMix's consistency weight at its chosen rate, then its number of experts
            (M = 4, 8) at both, on dev loss.
budget      LoRA and AdaMix as chosen, at every budget of their ladders (AdaMix's adds four times LoRA's longest;
            LoRA runs it too, as the equal-steps control), on the full and the small training set, every seed; dev
            loss every few steps (the curves).
supersense  the chosen LoRA and AdaMix (M = 4) at LoRA's middle budget on the supersense task, every seed.
routed      moa-soft and moa-sparse (chosen rates) at LoRA's middle budget, every seed.
full        full fine-tuning at LoRA's middle budget, first seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from adamix_ds.builtin_models import SMOLLM2
from adamix_ds.model_source import packaged_model_file

from . import wordnet_tasks
from .parts import REFERENCE_REGULARISERS, ExtendedStudy, dev_loss_curve
from .presets import Preset, StudyMethod
from .runner import Job, QualityStudy, paired_difference

REAL_PARTS = ("sweep", "budget", "supersense", "routed", "full")


@dataclass(frozen=True)
class RealModelSettings:
    full_train: int
    small_train: int
    lora_epochs: tuple[float, ...]
    """LoRA's budget ladder, in epochs of the full training set; AdaMix's adds four times the longest, which LoRA
    also runs as the equal-steps control (outside its ladder: the best-against-best comparison takes LoRA's best of
    the ladder, as the reference's protocol gives AdaMix four times LoRA's epochs)."""
    small_epochs: tuple[float, ...]
    """The ladder on the small training set (in its epochs), long enough for LoRA's dev loss to turn up."""
    learning_rates: tuple[float, ...] = (2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3, 1.28e-2, 2.56e-2)
    """Upward from the reference's 2e-4, until a rung below the top wins: on 100 steps of the full set 1e-4 was the
    worst rung for LoRA and AdaMix alike and 4e-4, the top rung, the best (benchmarks/results/
    quality_smollm2_sweep_partial.json); at 50 steps 8e-4, then 1.6e-3, then 3.2e-3, each the top rung when it ran, were
    the best for LoRA, AdaMix and the MoAs; LoRA and AdaMix turned at 3.2e-3. The MoAs' top rung won up to 2.56e-2,
    where it gained 0.010 (moa-soft) and 0.003 (moa-sparse) in dev loss over 1.28e-2: a plateau, so the ladder stops."""
    consistency_weights: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    experts: tuple[int, ...] = (4, 8)
    """AdaMix's rate and weight are swept with the first; then each M runs at that rate and weight, and dev loss picks M
    for the other parts."""
    lora_r: int = 4
    lora_alpha: int = 32
    curve_points: int = 6
    """Dev-loss evaluations per budget-part run (the curves)."""
    moa: dict = dataclasses.field(default_factory=lambda: {
        "moa-soft": {"moa_experts": "q,v,adapter,prompt", "lora_r": 1, "lora_alpha": 1, "adapter_size": 2,
                     "prompt_length": 2},
        "moa-sparse": {"moa_experts": "q,v,adapter", "lora_r": 2, "lora_alpha": 2, "adapter_size": 1}})
    """MoA experts sized to about LoRA r 4's served parameters on SmolLM2 (230,400; every expert and router is served):
    moa-soft 248,010, moa-sparse 236,220. LoRA experts on q and v as LoRA's; on all five projections even rank 1
    serves over 350,000."""


def _steps(epochs: float, train_size: int, batch: int) -> int:
    return max(1, round(epochs * train_size / batch))


class RealModelStudy(QualityStudy):
    """The study's runner with the packaged SmolLM2 as its base: no corpus, no tokenizer, no pretraining."""

    def prepare_data(self) -> None:
        self.task_files = wordnet_tasks.write_task_files(self.work_dir / "tasks", self.preset.sizes,
                                                         self.data_dir / "wordnet-splits.json", self.wordnet_dir)

    _base_lock = threading.Lock()

    def pretrain(self) -> Path:
        """Where the packaged SmolLM2 is dequantized once (WORK_DIR/base: fp32 safetensors, its tokenizer and
        template), by `ready_base` when a run first has to train: a study restored from kept runs never reads the
        GGUF."""
        return self.work_dir / "base"

    def ready_base(self, base: Path) -> Path:
        with self._base_lock:
            if (base / "config.json").is_file():
                return base
            import torch

            from adamix_ds.arguments import ModelArguments
            from adamix_ds.data.tokenizer import load_tokenizer

            args = ModelArguments(model_name_or_path=SMOLLM2)
            partial = base.with_name("base.partial")
            args.source.load(torch.float32, **args.pretrained_options()).save_pretrained(partial)
            load_tokenizer(args).save_pretrained(partial)
            (partial / "source.json").write_text(json.dumps(base_digest(), indent=2) + "\n")
            partial.replace(base)
            return base

    def _ds_config(self, name: str = "zero2.json") -> Path:
        """The shipped config with bf16 on where the CPU computes it in hardware (AMX/AVX512-BF16), as the issue's
        timings were taken; a GPU decides by itself ("auto")."""
        path = self.work_dir / f"bf16-{name}"
        if not path.is_file():
            config = json.loads(super()._ds_config(name).read_text())
            if not self.gpu:
                config["bf16"] = {"enabled": True}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2) + "\n")
        return path


def base_digest() -> dict:
    file = packaged_model_file(SMOLLM2)
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"name": SMOLLM2, "file": file.name, "bytes": file.stat().st_size, "sha256": digest.hexdigest()}


class RealModelParts(ExtendedStudy):
    """The real-model preset's parts; running, resuming and writing each part's JSON as the extension does."""

    parts = REAL_PARTS

    def __init__(self, study: RealModelStudy, settings: RealModelSettings) -> None:
        super().__init__(study, settings, settings.lora_r)
        self.batch = study.preset.finetune_batch

    def provenance(self) -> dict:
        return {"base": base_digest()}

    # Methods.
    def lora(self, rate: float) -> StudyMethod:
        options = {"method": "lora", "lora_r": self.settings.lora_r, "lora_alpha": self.settings.lora_alpha, "learning_rate": rate,
                   **REFERENCE_REGULARISERS}
        return StudyMethod(f"lora(lr={rate:g})", options)

    def adamix(self, rate: float, weight: float, experts: int = 4) -> StudyMethod:
        options = {"method": "adamix-lora", "lora_r": self.settings.lora_r, "lora_alpha": self.settings.lora_alpha,
                   "num_experts": experts, "expert_init": "identical", "consistency_weight": weight,
                   "learning_rate": rate, **REFERENCE_REGULARISERS}
        return StudyMethod(f"adamix-lora(lr={rate:g},cw={weight:g},M={experts})", options, ("merged",))

    def moa(self, name: str, rate: float) -> StudyMethod:
        return StudyMethod(f"{name}(lr={rate:g})", {"method": name, "learning_rate": rate, **self.settings.moa[name]})

    def middle_steps(self) -> int:
        return _steps(self.settings.lora_epochs[len(self.settings.lora_epochs) // 2], self.settings.full_train, self.batch)

    def _rows(self, jobs: list[Job]) -> list[dict]:
        """Each job's row (one seed each), running those not yet run."""
        self._run(jobs)
        return [self.study.rows([job])[0] for job in jobs]

    def _seeds(self, method: StudyMethod, task: str = "definition", **job) -> list[dict]:
        jobs = [Job(task, method, seed, **job) for seed in self.seeds]
        self._run(jobs)
        return self.study.rows(jobs)

    # Parts.
    def sweep(self) -> dict:
        """Each method's learning rate, then AdaMix's consistency weight, by the lowest dev loss on the first seed."""
        if self._sweep is not None:
            return self._sweep
        steps, seed, rates = self.middle_steps(), self.seeds[0], self.settings.learning_rates
        ladders = {"lora": [self.lora(r) for r in rates], "adamix-lora": [self.adamix(r, 1.0, self.settings.experts[0]) for r in rates],
                   **{name: [self.moa(name, r) for r in rates] for name in self.settings.moa}}
        rows, chosen = [], {}
        for label, methods in ladders.items():
            found = self._rows([Job("definition", m, seed, steps=steps) for m in methods])
            rows += found
            chosen[label] = methods[min(range(len(found)), key=lambda i: found[i]["dev_loss"]["mean"])]
        rate = chosen["adamix-lora"].options["learning_rate"]
        weights = [self.adamix(rate, w, self.settings.experts[0]) for w in self.settings.consistency_weights]
        found = self._rows([Job("definition", m, seed, steps=steps) for m in weights])
        rows += [r for r in found if r["method"] not in {row["method"] for row in rows}]
        best = weights[min(range(len(found)), key=lambda i: found[i]["dev_loss"]["mean"])]
        weight = best.options["consistency_weight"]
        sizes = [best] + [self.adamix(rate, weight, m) for m in self.settings.experts[1:]]
        found = [found[weights.index(best)]] + self._rows([Job("definition", m, seed, steps=steps) for m in sizes[1:]])
        rows += found[1:]
        chosen["adamix-lora"] = sizes[min(range(len(found)), key=lambda i: found[i]["dev_loss"]["mean"])]
        self._sweep = {"steps": steps, "chosen": chosen, "rows": rows}
        return self._sweep

    def part_sweep(self) -> dict:
        sweep = self.sweep()
        return {**sweep, "chosen": {k: dataclasses.asdict(m) for k, m in sweep["chosen"].items()},
                "samples": self.samples(sweep["chosen"], sweep["steps"])}

    def samples(self, methods: dict[str, StudyMethod], steps: int, count: int = 5) -> dict:
        """The first `count` test synsets' definitions by each method as served (its first mode), first seed, beside
        the prompt and the reference; a method whose predictions are not at hand (a run restored from records kept
        before predictions were) is left out."""
        with open(self.study.task_files["definition"]["test"]) as handle:
            test = [json.loads(line) for line, _ in zip(handle, range(count))]
        out = {"prompts": [t["prompt"] for t in test], "references": [t["completion"].strip() for t in test],
               "definitions": {}}
        for label, method in methods.items():
            run = self.study.work_dir / "runs" / Job("definition", method, self.seeds[0], steps=steps).name
            path = run / f"predictions-{method.modes[0]}-test.jsonl"
            if path.is_file():
                with open(path) as handle:
                    predicted = {p["key"]: p["prediction"].strip() for p in map(json.loads, handle)}
                out["definitions"][method.name] = [predicted[t["key"]] for t in test]
        return out

    def part_budget(self) -> dict:
        chosen = self.sweep()["chosen"]
        lora, adamix = chosen["lora"], chosen["adamix-lora"]
        sizes = {"full": (self.settings.full_train, self.settings.lora_epochs),
                 "small": (self.settings.small_train, self.settings.small_epochs)}
        plan = []
        for size_name, (train, epochs) in sizes.items():
            longest = 4 * epochs[-1]
            for method in (lora, adamix):
                for e in (*epochs, longest):
                    steps = _steps(e, train, self.batch)
                    job = {"steps": steps, "train_size": train if size_name == "small" else None,
                           "eval_steps": max(1, steps // self.settings.curve_points)}
                    jobs = [Job("definition", method, seed, **job) for seed in self.seeds]
                    plan.append((size_name, e, method is lora and e == longest, jobs))
        # Seed by seed, so that a study stopped part-way has every budget of its first seeds.
        self._run([jobs[i] for i in range(len(self.seeds)) for *_, jobs in plan])
        rows, curves = [], {}
        for size_name, e, control, jobs in plan:
            found = self.study.rows(jobs)
            for row in found:
                row["epochs"], row["size"], row["control"] = e, size_name, control
            rows += found
            runs = [self.study.work_dir / "runs" / j.name for j in jobs]
            curves[f"{jobs[0].method.name}/{size_name}/{jobs[0].steps}"] = [dev_loss_curve(r) for r in runs]
        return {"rows": rows, "dev_loss_curves": curves, "comparisons": comparisons(rows)}

    def part_supersense(self) -> dict:
        chosen = self.sweep()["chosen"]
        steps = self.middle_steps()
        rows = [r for label in ("lora", "adamix-lora") for r in self._seeds(chosen[label], "supersense", steps=steps)]
        return {"steps": steps, "rows": rows,
                "difference": paired_difference(rows[1], rows[0], "test/accuracy")}

    def part_routed(self) -> dict:
        chosen = self.sweep()["chosen"]
        steps = self.middle_steps()
        return {"steps": steps, "rows": [r for name in self.settings.moa for r in self._seeds(chosen[name], steps=steps)]}

    def part_full(self) -> dict:
        steps = self.middle_steps()
        method = StudyMethod(f"full(lr={self.settings.learning_rates[0]:g})",
                             {"method": "full", "learning_rate": self.settings.learning_rates[0]})
        job = Job("definition", method, self.seeds[0], steps=steps)
        return {"steps": steps, "rows": self._rows([job])}


def comparisons(rows: list[dict], metric: str = "test/rougeL") -> dict:
    """AdaMix (merged, each M) minus LoRA seed by seed, per training-set size: `metric` and the dev loss (what chose)
    at equal steps (the control included), and `metric` with each method at its best dev budget (lowest dev loss) of
    its ladder (LoRA's control left out)."""
    out = {}
    for size in sorted({r["size"] for r in rows}):
        mine = [r for r in rows if r["size"] == size]
        lora = {r["steps"]: r for r in mine if r["method"].startswith("lora(")}
        for name in sorted({r["method"] for r in mine if r["method"].startswith("adamix-lora(")}):
            adamix = {r["steps"]: r for r in mine if r["method"] == name}
            best_lora = min((r for r in lora.values() if not r.get("control")), key=lambda r: r["dev_loss"]["mean"])
            best_adamix = min(adamix.values(), key=lambda r: r["dev_loss"]["mean"])
            shared = [s for s in sorted(lora) if s in adamix]
            out[f"{size}/{name}"] = {
                "equal_steps": {s: paired_difference(adamix[s], lora[s], metric) for s in shared},
                "equal_steps_dev_loss": {s: paired_difference(adamix[s], lora[s], "dev_loss") for s in shared},
                "best_dev": {"lora_steps": best_lora["steps"], "adamix_steps": best_adamix["steps"],
                             "difference": paired_difference(best_adamix, best_lora, metric)},
            }
    return out


REAL_PRESETS = {
    "smollm2": (Preset(name="smollm2", model={}, vocab_size=0, pretrain_steps=0, pretrain_batch=0, pretrain_ranks=1,
                       pretrain_lr=0.0, seq_length=64, sizes={"train": 8000, "dev": 200, "test": 400},
                       finetune_steps=0, finetune_batch=8, seeds=(0, 1, 2), parallel_jobs=1, threads_per_job=2,
                       eval_batch=32, max_new_tokens={"supersense": 8, "definition": 32}),
                RealModelSettings(full_train=8000, small_train=1000, lora_epochs=(0.025, 0.05, 0.1),
                                  small_epochs=(0.5, 1.0, 2.0))),
    "smollm2-smoke": (Preset(name="smollm2-smoke", model={}, vocab_size=0, pretrain_steps=0, pretrain_batch=0,
                             pretrain_ranks=1, pretrain_lr=0.0, seq_length=64, sizes={"train": 32, "dev": 4, "test": 6},
                             finetune_steps=0, finetune_batch=4, seeds=(0, 1), parallel_jobs=2, threads_per_job=1,
                             eval_batch=8, max_new_tokens={"supersense": 3, "definition": 4}),
                      RealModelSettings(full_train=32, small_train=16, lora_epochs=(0.125, 0.25), small_epochs=(0.25,),
                                        learning_rates=(4e-4,), consistency_weights=(1.0,), experts=(4,), moa={})),
}
"""smollm2: 8 sequences of at most 64 tokens a step, bf16, one rank, about 7 hours of a 2-core CPU (LoRA 0.7-1.0 s
a step, AdaMix with consistency 1.5-2 s, scoring a run about 50 s): LoRA's ladders are 25, 50 and 100 steps on the
full set and 62, 125 and 250 on the small one (2 epochs), AdaMix's add 400 and 1,000, which LoRA also runs as the
equal-steps control (about 20 minutes a seed); the sweep and the other parts run at 50 steps. smollm2-smoke: the
tests' end-to-end run (a few steps, two seeds)."""


def markdown(results: dict) -> str:
    """Each part's rows as a table (mean ± standard deviation over seeds), and the paired differences."""
    columns = [("dev loss", "dev_loss", 3), ("dev ROUGE-L", "dev/rougeL", 1), ("test BLEU", "test/bleu", 1),
               ("test ROUGE-L", "test/rougeL", 1), ("test accuracy", "test/accuracy", 1),
               ("test ranked", "test/ranked_accuracy", 1), ("expert spread", "expert_divergence", 4),
               ("update norm", "update_norm", 1), ("experts' update norm", "expert_update_norm", 1)]
    lines = []
    for part, result in results.items():
        lines += [f"**{part}** ({run_time(result['rows'])}; base {result['base']['file']}, sha256 "
                  f"{result['base']['sha256'][:12]})", ""]
        head = ["method", "task", "size", "steps", "seeds", "served params"] + [name for name, _, _ in columns]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in result["rows"]:
            method = r["method"] + (" (control)" if r.get("control") else "")
            cells = [method, r["task"], r.get("size", "full"), str(r["steps"]), str(len(r["seeds"])),
                     f"{r['served_parameters']:,}"]
            cells += [f"{r[key]['mean']:.{digits}f} ± {r[key]['std']:.{digits}f}" if key in r else ""
                      for _, key, digits in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += samples_table(result.get("samples"))
        for name, comparison in result.get("comparisons", {}).items():
            equal = "; ".join(f"{steps} steps {d['mean']:+.2f} ± {d['std']:.2f}"
                              for steps, d in comparison["equal_steps"].items())
            loss = "; ".join(f"{steps} steps {d['mean']:+.3f} ± {d['std']:.3f}"
                             for steps, d in comparison.get("equal_steps_dev_loss", {}).items())
            best = comparison["best_dev"]
            lines += [f"{name} minus LoRA, test ROUGE-L seed by seed: {equal}; each at its best dev budget (LoRA "
                      f"{best['lora_steps']}, AdaMix {best['adamix_steps']} steps) "
                      f"{best['difference']['mean']:+.2f} ± {best['difference']['std']:.2f}.", ""]
            lines += [f"{name} minus LoRA, dev loss seed by seed: {loss}.", ""] if loss else []
    return "\n".join(lines) + "\n"


def run_time(rows: list[dict]) -> str:
    """The part's runs' training and scoring time, all seeds (a run restored from records kept before timings were
    has none and is counted apart)."""
    configs = {(r["method"], r["task"], r["steps"], r["train_size"]): r.get("run_seconds") for r in rows}
    known = [s for s in configs.values() if s is not None]
    text = f"runs {sum(known) / 60:.0f} min"
    untimed = len(configs) - len(known)
    return text + (f", {untimed} configuration{'s' * (untimed > 1)} untimed" if untimed else "")


def samples_table(samples: dict | None) -> list[str]:
    """The samples as a markdown table, a row per test synset, a column per method."""
    if not samples or not samples["definitions"]:
        return []
    methods = list(samples["definitions"])
    lines = ["Test definitions, first seed (greedy):", "", "| prompt | reference | " + " | ".join(methods) + " |",
             "|" + "---|" * (len(methods) + 2)]
    for i, prompt in enumerate(samples["prompts"]):
        cells = [prompt, samples["references"][i], *(samples["definitions"][m][i] for m in methods)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return lines + [""]


def plot_budget(result: dict, path: Path) -> Path:
    """Dev loss and dev ROUGE-L (mean ± standard deviation over seeds) at the end of each budget's runs, LoRA and
    AdaMix, one panel pair per training-set size, LoRA's control hollow and joined by a dotted line; dashed, the
    dev loss during each method's longest runs (mean over seeds), which shows where it turns up within one schedule."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    sizes = sorted({r["size"] for r in result["rows"]})
    figure, axes = plt.subplots(len(sizes), 2, figsize=(10, 3.6 * len(sizes)), squeeze=False)
    for row_axes, size in zip(axes, sizes):
        series: dict[str, list] = {}
        for row in result["rows"]:
            if row["size"] == size:
                series.setdefault(row["method"], []).append(row)
        for axis, key, label in zip(row_axes, ("dev_loss", "dev/rougeL"), ("dev loss", "dev ROUGE-L")):
            for method, rows in series.items():
                rows = sorted(rows, key=lambda r: r["steps"])
                ladder = [r for r in rows if not r.get("control")]
                drawn = axis.errorbar([r["steps"] for r in ladder], [r[key]["mean"] for r in ladder],
                                      yerr=[r[key]["std"] for r in ladder], marker="o", capsize=3, label=method)
                color = drawn.lines[0].get_color()
                for control in (r for r in rows if r.get("control")):
                    axis.plot([ladder[-1]["steps"], control["steps"]], [ladder[-1][key]["mean"], control[key]["mean"]],
                              linestyle=":", color=color)
                    axis.errorbar([control["steps"]], [control[key]["mean"]], yerr=[control[key]["std"]], marker="o",
                                  capsize=3, markerfacecolor="white", color=color,
                                  label=f"{method} at {control['steps']} steps, control (outside its ladder)")
                curves = result.get("dev_loss_curves", {}).get(f"{method}/{size}/{rows[-1]['steps']}")
                if key == "dev_loss" and curves:
                    steps = sorted(set.intersection(*({s for s, _ in c} for c in curves)) - {0})
                    means = [sum(dict(c)[s] for c in curves) / len(curves) for s in steps]
                    axis.plot(steps, means, linestyle="--", linewidth=1, color=color,
                              label=f"{method}, during its {rows[-1]['steps']}-step runs")
            axis.set_xscale("log")
            axis.set_xticks(sorted({r["steps"] for rows in series.values() for r in rows}))
            axis.xaxis.set_major_formatter(ScalarFormatter())
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_xlabel(f"steps ({size} training set)")
            axis.set_ylabel(label)
        row_axes[0].legend(fontsize=7)
    figure.suptitle("SmolLM2-135M-Instruct, WordNet definitions: LoRA and AdaMix-LoRA against budget")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
