"""Every wait in the suite is bounded and waits for its event: a hang fails a test instead of stalling CI, and no
test passes or fails by how long a fixed sleep happened to be. Checked on the tests' syntax trees (scripts the
tests pass to children as strings are not parsed: their parents bound them)."""

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SUBPROCESS_CALLS = {"run", "check_output", "check_call", "call"}
PIPES = {"stdout", "stderr"}


def unbounded_waits(source: str) -> list[str]:
    """The waits in `source` that can block forever or sleep a fixed time outside a polling loop, as
    'line N: what'."""
    found = []
    tree = ast.parse(source)

    def visit(node: ast.AST, in_loop: bool) -> None:
        if isinstance(node, (ast.While, ast.For)):
            if isinstance(node, ast.For) and _is_pipe(node.iter):
                found.append(f"line {node.lineno}: iterates over a pipe (use launching.read_line)")
            for child in ast.iter_child_nodes(node):
                visit(child, True)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_loop = False
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            keywords = {k.arg for k in node.keywords}
            if isinstance(owner, ast.Name) and owner.id == "subprocess" and name in SUBPROCESS_CALLS \
                    and "timeout" not in keywords:
                found.append(f"line {node.lineno}: subprocess.{name} without a timeout")
            if name in ("wait", "communicate") and not node.args and "timeout" not in keywords:
                found.append(f"line {node.lineno}: .{name}() without a timeout")
            if name == "readline" and _is_pipe(owner):
                found.append(f"line {node.lineno}: readline on a pipe (use launching.read_line)")
            if isinstance(owner, ast.Name) and owner.id == "time" and name == "sleep" and not in_loop:
                found.append(f"line {node.lineno}: a fixed sleep (wait for the event: launching.wait_for)")
        for child in ast.iter_child_nodes(node):
            visit(child, in_loop)

    visit(tree, False)
    return found


def _is_pipe(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr in PIPES


@pytest.mark.parametrize("snippet, expected", [
    ("import subprocess\nsubprocess.run(['ls'])", ["line 2: subprocess.run without a timeout"]),
    ("import subprocess\nsubprocess.run(['ls'], timeout=5)", []),
    ("p.wait()\np.wait(5)\np.communicate(timeout=3)", ["line 1: .wait() without a timeout"]),
    ("line = p.stdout.readline()", ["line 1: readline on a pipe (use launching.read_line)"]),
    ("for line in p.stdout:\n    pass", ["line 1: iterates over a pipe (use launching.read_line)"]),
    ("import time\ntime.sleep(3)", ["line 2: a fixed sleep (wait for the event: launching.wait_for)"]),
    ("import time\nwhile not done():\n    time.sleep(0.5)", []),
    ("import time\nwhile x:\n    def f():\n        time.sleep(1)",
     ["line 4: a fixed sleep (wait for the event: launching.wait_for)"]),
])
def test_the_check_finds_unbounded_waits(snippet, expected):
    assert unbounded_waits(snippet) == expected


def test_no_test_waits_without_a_bound_or_sleeps_a_fixed_time():
    found = {str(path.relative_to(TESTS)): waits for path in sorted(TESTS.rglob("*.py"))
             if "fixtures" not in path.parts and (waits := unbounded_waits(path.read_text()))}
    assert not found, found
