"""Collect, where pip can download, the wheels the GPU machine lacks into .gpu_wheels/ (git-ignored), within the
size that may travel with the working tree to it; benchmarks/gpu_check.py installs them there offline.

    python benchmarks/gpu_wheels.py [--python 3.12] [--limit_mb 40]

The GPU machine has torch, transformers, peft, safetensors, sentencepiece, tensorboard, pyarrow, pandas and
DeepSpeed's own runtime needs (ninja, py-cpuinfo, msgpack, einops) but not DeepSpeed, datasets and theirs.
DeepSpeed ships as a source distribution: it is built here into a pure-Python wheel (`pip wheel --no-deps`).
The versions are the ones installed here, so the check runs what the tests ran.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".gpu_wheels"
BINARY = ("datasets", "dill", "multiprocess", "hjson", "pydantic", "pydantic-core", "annotated-types",
          "typing-inspection", "xxhash", "fsspec")
"""Wheels from the index for the GPU machine's Python (pydantic-core and xxhash are compiled, per Python)."""
SOURCE = ("deepspeed",)
"""Built here into wheels."""


def collect(python: str, limit_mb: float) -> list[Path]:
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version(name)}" for name in BINARY]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python, "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--dest", str(WHEELS), *pins], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(WHEELS),
                    *[f"{name}=={version(name)}" for name in SOURCE]], check=True)
    wheels = sorted(WHEELS.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    if size > limit_mb:
        raise SystemExit(f"{size:.1f} MiB of wheels in {WHEELS}, more than --limit_mb {limit_mb}: the working tree "
                         "and the wheels travel together within 64 MiB")
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {WHEELS}")
    return wheels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="The GPU machine's Python version.")
    parser.add_argument("--limit_mb", type=float, default=40.0, help="Most MiB of wheels (the tree needs the rest).")
    args = parser.parse_args(argv)
    collect(args.python, args.limit_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
