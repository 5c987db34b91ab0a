"""The README and docs/ stay runnable as written: every relative link resolves, and every `python ...` or
`deepspeed ...` command names a script that exists with options that its --help lists."""

import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")


def _code(page: Path) -> list[str]:
    """Shell lines of the page's fenced blocks (continuation lines joined) and its inline code spans."""
    lines, fenced, block = [], False, []
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            if fenced:
                lines += "\n".join(block).replace("\\\n", " ").splitlines()
            fenced, block = not fenced, []
        elif fenced:
            block.append(line)
        else:
            lines += INLINE.findall(line)
    return lines


def _invocations(line: str) -> list[tuple[str, list[str]]]:
    """(script, its --options) of every python/deepspeed command in a shell line (each part of a && chain)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    found, command = [], []
    for word in words + ["&&"]:
        if word not in ("&&", "||", ";", "|"):
            command.append(word)
            continue
        launcher = next((i for i, w in enumerate(command) if Path(w).name in ("python", "python3", "deepspeed")), None)
        if launcher is not None:
            rest = command[launcher + 1:]
            if Path(command[launcher]).name == "deepspeed":
                rest = rest[next((i for i, w in enumerate(rest) if w.endswith(".py")), len(rest)):]
            if rest and rest[0] == "-m":
                found.append(("-m " + rest[1], []))
            elif rest and rest[0].endswith(".py"):
                found.append((rest[0], [w.split("=")[0] for w in rest[1:] if w.startswith("--")]))
        command = []
    return found


@cache
def _help(script: str) -> str:
    """The script's --help text, run in this process (its imports are shared, so it takes a moment)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_every_command_names_a_script_that_exists_with_options_its_help_lists():
    commands = [(page, script, options) for page in PAGES for line in _code(page)
                for script, options in _invocations(line)]
    scripts = {script for _, script, _ in commands}
    assert {"launch/train.py", "launch/generate.py", "-m pytest"} <= scripts  # the parser finds the main commands
    problems = []
    for page, script, options in commands:
        where = page.relative_to(REPO)
        if script.startswith("-m "):
            if importlib.util.find_spec(script[3:]) is None:
                problems.append(f"{where}: python {script}: no such module")
            continue
        if not (REPO / script).is_file():
            problems.append(f"{where}: {script}: no such script")
            continue
        listed = _help(script)
        problems += [f"{where}: {script} {option}: not in its --help" for option in options
                     if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", listed)]
    assert not problems, problems
