"""The extended study: does AdaMix, trained the way its reference trains it, beat LoRA somewhere?

Each part runs on its own (`--parts`), on the supersense task, resumes from the runs it finds (job
directories are keyed by method, budget, data size and seed) and reports its time. AdaMix is scored as it is
served, merged (the first table shows random routing is no better):

budget      LoRA and AdaMix-LoRA with the reference's regularisers (lora_dropout 0.1, label smoothing 0.1,
            weight decay 0.01, no clipping) and AdaMix's reference init (identical A experts). A sweep on
            dev (first seed, the first budget) picks each method's learning rate (half, the preset's, double)
            and AdaMix's consistency weight (1, 10, 100) the same way; then both run at every budget and seed.
experts     AdaMix-LoRA as chosen, with M = 2, 4, 8 experts, at the middle budget.
lowdata     LoRA and AdaMix-LoRA as chosen on a training set so small, at a rank so large, that LoRA
            overfits; dev loss every few steps shows where.
routed      the homogeneous MoE-LoRA baselines (molora, hydralora) beside MoA (soft, sparse) at about LoRA's
            served parameters.
adapter     the adapter and AdaMix-adapter as the first table trains them (Houlsby's near-identity init)
            and with the reference's (every weight N(0, 0.02), experts drawn independently).

Choices are made on dev; test only reports.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from adamix_ds.config import METHODS

from .presets import StudyMethod
from .runner import Job, QualityStudy, paired_difference, run_side_by_side

DEFAULT_EXPERTS = METHODS["adamix-lora"].num_experts
TASK = "supersense"
METRIC = "accuracy"
PARTS = ("budget", "experts", "lowdata", "routed", "adapter")
REFERENCE_REGULARISERS = {"lora_dropout": 0.1, "label_smoothing_factor": 0.1, "weight_decay": 0.01,
                          "max_grad_norm": 0}
"""The AdaMix reference's NLG recipe for LoRA and AdaMix alike (run_train_e2e.sh, run_train_e2e_lora_only.sh)."""


@dataclass(frozen=True)
class PartSettings:
    budgets: tuple[int, ...]
    rate_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    consistency_weights: tuple[float, ...] = (1.0, 10.0, 100.0)
    experts: tuple[int, ...] = (2, 4, 8)
    lowdata_size: int = 300
    lowdata_rank: int = 32
    lowdata_steps: int = 1500
    lowdata_eval_every: int = 100


SETTINGS = {
    "cpu": PartSettings(budgets=(600, 1200, 2400)),
    "gpu": PartSettings(budgets=(600, 1800, 4800)),
    "smoke": PartSettings(budgets=(2, 4), rate_factors=(1.0, 2.0), consistency_weights=(1.0, 100.0), experts=(2,),
                          lowdata_size=16, lowdata_rank=4, lowdata_steps=4, lowdata_eval_every=2),
}


def _lora(rank: int, **options) -> dict:
    return {"method": "lora", "lora_r": rank, **REFERENCE_REGULARISERS, **options}


def _adamix(rank: int, **options) -> dict:
    return {"method": "adamix-lora", "lora_r": rank, "expert_init": "identical", **REFERENCE_REGULARISERS, **options}


def _name(label: str, options: dict) -> str:
    """A method name that says its swept values, e.g. adamix-lora(lr=0.005,cw=100)."""
    shown = {"lr": options.get("learning_rate"), "cw": options.get("consistency_weight"),
             "M": options.get("num_experts"), "r": options.get("lora_r")}
    return label + "(" + ",".join(f"{k}={v:g}" for k, v in shown.items() if v is not None) + ")"


class ExtendedStudy:
    """The parts, on a QualityStudy whose data and pretrained base they share."""

    parts = PARTS

    def __init__(self, study: QualityStudy, settings: PartSettings, lora_rank: int) -> None:
        self.study, self.settings, self.rank = study, settings, lora_rank
        self.seeds = study.preset.seeds
        self.out = study.work_dir / "parts"
        self._sweep: dict | None = None

    # Running.
    def run(self, parts: tuple[str, ...]) -> dict:
        unknown = sorted(set(parts) - set(self.parts))
        if unknown:
            raise ValueError(f"unknown parts {unknown}; known: {', '.join(self.parts)}")
        self.study.prepare_data()
        self.base = self.study.pretrain()
        results = {}
        for part in parts:
            started = time.perf_counter()
            result = getattr(self, f"part_{part}")()
            result["seconds"] = time.perf_counter() - started
            result.update(self.provenance())
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / f"{part}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            results[part] = result
        return results

    def provenance(self) -> dict:
        """What each part's results record about where they came from, beside the runs (none here: the base is
        pretrained by the study itself)."""
        return {}

    def _run(self, jobs: list[Job]) -> None:
        run_side_by_side(lambda job: self.study.run_job(job, self.base), jobs, self.study.preset.parallel_jobs)

    def _seeds(self, method: StudyMethod, **job) -> list[Job]:
        return [Job(TASK, method, seed, **job) for seed in self.seeds]

    def _rows_of(self, method: StudyMethod, **job) -> list[dict]:
        """Run `method` on every seed (runs already made are read back) and return its rows."""
        jobs = self._seeds(method, **job)
        self._run(jobs)
        return self.study.rows(jobs)

    # Part a: the sweep, then every budget.
    def sweep(self) -> dict:
        """Each method's configuration with the best dev accuracy (merged serving for AdaMix) on the first seed at
        the first budget; dev loss breaks ties. Made once per study: the parts after it reuse its choice."""
        if self._sweep is not None:
            return self._sweep
        s, rate = self.settings, self.study.learning_rate(StudyMethod("lora", {"method": "lora"}))
        candidates = {
            "lora": [StudyMethod(_name("lora", o), o) for o in
                     (_lora(self.rank, learning_rate=rate * f) for f in s.rate_factors)],
            "adamix-lora": [StudyMethod(_name("adamix-lora", o), o, ("merged",)) for o in
                            (_adamix(self.rank, learning_rate=rate * f, consistency_weight=w)
                             for f in s.rate_factors for w in s.consistency_weights)],
        }
        jobs = {label: [Job(TASK, m, self.seeds[0], steps=s.budgets[0]) for m in methods]
                for label, methods in candidates.items()}
        self._run([job for group in jobs.values() for job in group])
        chosen, table = {}, []
        for label, group in jobs.items():
            rows = [self.study.rows([job])[0] for job in group]
            table += rows
            best = max(range(len(rows)), key=lambda i: (rows[i][f"dev/{METRIC}"]["mean"], -rows[i]["dev_loss"]["mean"]))
            chosen[label] = group[best].method
        self._sweep = {"chosen": chosen, "rows": table}
        return self._sweep

    def part_budget(self) -> dict:
        sweep = self.sweep()
        rows = [row for method in self.chosen().values() for steps in self.settings.budgets
                for row in self._rows_of(method, steps=steps)]
        chosen = {label: dataclasses.asdict(method) for label, method in sweep["chosen"].items()}
        return {"sweep": {**sweep, "chosen": chosen}, "rows": rows, "comparisons": budget_comparisons(rows)}

    def chosen(self) -> dict[str, StudyMethod]:
        """Part a's choices (its sweep runs first if it has not)."""
        return self.sweep()["chosen"]

    # Part b.
    def part_experts(self) -> dict:
        adamix = self.chosen()["adamix-lora"]
        steps = self.settings.budgets[len(self.settings.budgets) // 2]
        rows = []
        for m in self.settings.experts:
            options = {**adamix.options, "num_experts": m}
            method = adamix if m == DEFAULT_EXPERTS else StudyMethod(_name("adamix-lora", options), options, adamix.modes)
            rows += self._rows_of(method, steps=steps)  # the default M is part a's run at this budget
        rows += self._rows_of(self.chosen()["lora"], steps=steps)
        return {"steps": steps, "rows": rows}

    # Part c.
    def part_lowdata(self) -> dict:
        s = self.settings
        rows, curves = [], {}
        for label, method in self.chosen().items():
            options = {**method.options, "lora_r": s.lowdata_rank}
            wide = StudyMethod(_name(label, options), options, method.modes)
            jobs = self._seeds(wide, steps=s.lowdata_steps, train_size=s.lowdata_size, eval_steps=s.lowdata_eval_every)
            self._run(jobs)
            rows += self.study.rows(jobs)
            curves[wide.name] = [dev_loss_curve(self.study.work_dir / "runs" / job.name) for job in jobs]
        return {"train_size": s.lowdata_size, "rank": s.lowdata_rank, "steps": s.lowdata_steps, "rows": rows,
                "dev_loss_curves": curves}

    # Part d.
    def part_routed(self) -> dict:
        methods = [m for m in self.study.methods if m.name in ("moa-soft", "moa-sparse")] + routed_baselines()
        return {"rows": [row for method in methods for row in self._rows_of(method)]}

    # Part e.
    def part_adapter(self) -> dict:
        first = [m for m in self.study.methods if m.name in ("adapter", "adamix-adapter")]
        reference = [dataclasses.replace(m, name=f"{m.name}(bert-init)", options={**m.options, "adapter_init": "bert"})
                     for m in first]
        return {"rows": [row for method in first + reference for row in self._rows_of(method)]}


def routed_baselines() -> list[StudyMethod]:
    """molora and hydralora on LoRA's targets (q, v) with rank-1 experts, sized to about LoRA's served parameters
    on the study's base (each expert and router is served)."""
    return [StudyMethod("molora", {"method": "molora", "target_modules": "q_proj,v_proj", "num_experts": 5,
                                   "lora_r": 1, "lora_alpha": 1}),
            StudyMethod("hydralora", {"method": "hydralora", "target_modules": "q_proj,v_proj", "num_experts": 7,
                                      "lora_r": 1, "lora_alpha": 1})]


def dev_loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, dev loss) of every evaluation the trainer logged (merged serving for AdaMix)."""
    history = json.loads((run_dir / "run.json").read_text())["history"]
    curve = []
    for entry in history:
        losses = [v for k, v in entry.items() if k.startswith("eval/") and k.endswith("/loss")
                  and not k.startswith("eval/random/")]
        if losses:
            curve.append((entry["step"], losses[0]))
    return curve


def budget_comparisons(rows: list[dict]) -> dict:
    """Test accuracy of AdaMix (merged) minus LoRA's, seed by seed: at equal steps, and each at the budget of its
    best mean dev accuracy."""
    lora = {r["steps"]: r for r in rows if r["method"].startswith("lora(")}
    adamix = {r["steps"]: r for r in rows if r["method"].startswith("adamix-lora(") and r["serving"] == "merged"}
    key = f"test/{METRIC}"
    equal = {steps: paired_difference(adamix[steps], lora[steps], key) for steps in sorted(lora) if steps in adamix}
    best = {name: max(table.values(), key=lambda r: r[f"dev/{METRIC}"]["mean"])
            for name, table in (("lora", lora), ("adamix-lora", adamix))}
    return {
        "equal_steps": equal,
        "best_dev": {name: {"steps": r["steps"], "test": r[key], "dev": r[f"dev/{METRIC}"]} for name, r in best.items()},
        "best_dev_difference": paired_difference(best["adamix-lora"], best["lora"], key),
    }
