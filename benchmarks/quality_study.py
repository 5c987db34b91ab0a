"""The quality study: does the mixture beat LoRA at equal served parameters? (docs/quality.md)

python benchmarks/quality_study.py --preset cpu      # about an hour on 2 CPU cores
python benchmarks/quality_study.py --preset gpu      # one GPU
python benchmarks/quality_study.py --preset cpu --parts budget,experts,lowdata,routed,adapter   # the extension
python benchmarks/quality_study.py --preset smollm2 --parts sweep,budget,supersense,routed,full   # SmolLM2-135M

Pretrains a small Llama on the Python documentation (Debian's python3-doc), fine-tunes every method on
two WordNet tasks (wordnet-base) for several seeds, and writes results.json and results.md under
--work_dir. Finished stages and runs are reused, so an interrupted study continues where it stopped.
"""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from quality.parts import PARTS, SETTINGS, ExtendedStudy
from quality.parts_report import markdown, plot_budget
from quality.presets import METHODS, PRESETS
from quality.real_model import REAL_PARTS, REAL_PRESETS, RealModelParts, RealModelStudy
from quality.real_model import markdown as real_model_markdown
from quality.real_model import plot_budget as plot_real_model_budget
from quality.runner import QualityStudy, run_study
from quality.wordnet_tasks import TASKS

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS) + sorted(REAL_PRESETS), default="cpu",
                        help="smollm2: the packaged SmolLM2-135M-Instruct as the base, no pretraining (its own parts).")
    parser.add_argument("--work_dir", type=Path, help="default: outputs/quality_study/PRESET")
    parser.add_argument("--data_dir", type=Path, default=Path("outputs/quality_study/data"),
                        help="Corpus, tokenizers and the WordNet splits, shared by presets.")
    parser.add_argument("--methods", help="Comma-separated subset of: " + ", ".join(m.name for m in METHODS["cpu"]))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", help="Comma-separated seeds (default: the preset's).")
    parser.add_argument("--docs_root", type=Path, help="Python documentation HTML root (default: python3-doc's).")
    parser.add_argument("--parts", default="base",
                        help="Comma-separated: base (the first table: every method, both tasks) and the extension's "
                             f"parts on supersense: {', '.join(PARTS)}.")
    parser.add_argument("--keep_runs", type=Path,
                        help="Copy each finished run's records (run.json, scores.json, timing.json, the test "
                             "predictions) here and restore the runs found here instead of running them: a long study "
                             "committed run by run and resumed elsewhere "
                             "(benchmarks/results/quality_smollm2/runs holds the SmolLM2 study's).")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if args.preset in REAL_PRESETS:
        return real_model_main(args, parts)
    unknown = sorted(set(parts) - {"base", *PARTS})
    if unknown or not parts:
        parser.error(f"--parts: unknown {unknown}; use base, {', '.join(PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    methods = METHODS[args.preset]
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - {m.name for m in methods})
        if unknown:
            parser.error(f"--methods: unknown {unknown}")
        methods = [m for m in methods if m.name in wanted]
    tasks = tuple(args.tasks.split(","))
    if set(tasks) - set(TASKS):
        parser.error(f"--tasks: use {', '.join(TASKS)}")
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    work_dir = args.work_dir or Path("outputs/quality_study") / args.preset
    train_script = REPO / "launch" / "train.py"
    if "base" in parts:
        results = run_study(PRESETS[args.preset], methods, work_dir, args.data_dir, train_script,
                            seeds=seeds, tasks=tasks, docs_root=args.docs_root, keep_runs=args.keep_runs)
        print((work_dir / "results.md").read_text())
        logging.info("results: %s", work_dir / "results.json")
        if not results["rows"]:
            return 1
    extension = tuple(p for p in parts if p != "base")
    if extension:
        preset = PRESETS[args.preset] if not seeds else dataclasses.replace(PRESETS[args.preset], seeds=seeds)
        study = QualityStudy(preset, METHODS[args.preset], work_dir, args.data_dir, train_script,
                             docs_root=args.docs_root, keep_runs=args.keep_runs)
        lora_rank = next(m for m in METHODS[args.preset] if m.name == "lora").options["lora_r"]
        ExtendedStudy(study, SETTINGS[args.preset], lora_rank).run(extension)
        report_parts(work_dir / "parts", PARTS, markdown, plot_budget)
    return 0


def report_parts(directory: Path, parts: tuple[str, ...], markdown_of, plot_of) -> None:
    """results.md from every part's JSON in `directory` (this run's parts and earlier ones), and budget.png where the
    budget part has run; the report is printed."""
    results = {part: json.loads((directory / f"{part}.json").read_text()) for part in parts
               if (directory / f"{part}.json").is_file()}
    report = markdown_of(results)
    (directory / "results.md").write_text(report)
    if "budget" in results:
        logging.info("plot: %s", plot_of(results["budget"], directory / "budget.png"))
    print(report)


def real_model_main(args, parts: list[str]) -> int:
    """The SmolLM2 preset: its parts (real_model.py), results under WORK_DIR/parts/."""
    if "base" in parts:
        parts = list(REAL_PARTS)
    unknown = sorted(set(parts) - set(REAL_PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown} for --preset {args.preset}; use {', '.join(REAL_PARTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    preset, settings = REAL_PRESETS[args.preset]
    if args.seeds:
        preset = dataclasses.replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    work_dir = args.work_dir or Path("outputs/quality_study") / args.preset
    study = RealModelStudy(preset, [], work_dir, args.data_dir, REPO / "launch" / "train.py", keep_runs=args.keep_runs)
    RealModelParts(study, settings).run(tuple(parts))
    report_parts(work_dir / "parts", REAL_PARTS, real_model_markdown, plot_real_model_budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
