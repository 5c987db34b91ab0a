"""The quality study: does the mixture beat LoRA at equal served parameters? (README: Quality study)

python benchmarks/quality_study.py --preset cpu      # about an hour on 2 CPU cores
python benchmarks/quality_study.py --preset gpu      # one GPU

Pretrains a small Llama on the Python documentation (Debian's python3-doc), fine-tunes every method on
two WordNet tasks (wordnet-base) for several seeds, and writes results.json and results.md under
--work_dir. Finished stages and runs are reused, so an interrupted study continues where it stopped.
"""

import argparse
import logging
import sys
from pathlib import Path

from adamix_ds.study.presets import METHODS, PRESETS
from adamix_ds.study.runner import run_study
from adamix_ds.study.wordnet_tasks import TASKS

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--work_dir", type=Path, help="default: outputs/quality_study/PRESET")
    parser.add_argument("--data_dir", type=Path, default=Path("outputs/quality_study/data"),
                        help="Corpus, tokenizers and the WordNet splits, shared by presets.")
    parser.add_argument("--methods", help="Comma-separated subset of: " + ", ".join(m.name for m in METHODS["cpu"]))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", help="Comma-separated seeds (default: the preset's).")
    parser.add_argument("--docs_root", type=Path, help="Python documentation HTML root (default: python3-doc's).")
    args = parser.parse_args(argv)
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
    results = run_study(PRESETS[args.preset], methods, work_dir, args.data_dir, REPO / "launch" / "train.py",
                        seeds=seeds, tasks=tasks, docs_root=args.docs_root)
    print((work_dir / "results.md").read_text())
    logging.info("results: %s", work_dir / "results.json")
    return 0 if results["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
