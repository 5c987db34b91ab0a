"""A rank finds the launchers above it by their command lines and notices when one of them ends (a real process
tree: a runner called deepspeed, a per-node launcher, a rank)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from launching import read_line

from adamix_ds.training.launcher_watch import gone, launcher_processes, watch_launcher

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")

LEAF = "import time; print('ready', flush=True); time.sleep(60)"
PYTHON = sys.executable  # the children's own sys.executable follows argv[0], which the runner renames
NODE = (f"import subprocess, sys; p = subprocess.Popen([{PYTHON!r}, '-c', sys.argv[1]], stdout=sys.stdout); "
        "print(p.pid, flush=True); p.wait()")
RUNNER = (f"import subprocess, sys; subprocess.Popen([{PYTHON!r}, '-c', sys.argv[1], sys.argv[2], "
          "'deepspeed.launcher.launch'], stdout=sys.stdout).wait()")


def _tree():
    """bash exec -a deepspeed python (runner) -> python ... deepspeed.launcher.launch (node) -> python (rank)."""
    runner = subprocess.Popen(["bash", "-c", f'exec -a deepspeed {sys.executable} -c "$0" "$1" "$2"', RUNNER, NODE,
                               LEAF], stdout=subprocess.PIPE, text=True, start_new_session=True)
    leaf = int(read_line(runner.stdout, 60))
    assert read_line(runner.stdout, 60).strip() == "ready"
    return runner, leaf


def test_the_runner_and_the_node_launcher_are_watched_and_their_end_is_seen():
    runner, leaf = _tree()
    try:
        watched = launcher_processes(leaf)
        assert [name for _, _, name in watched] == ["deepspeed.launcher.launch", "deepspeed"]
        assert watched[1][0] == runner.pid
        assert gone(watched) is None
        seen = []
        done = threading.Event()
        watch_launcher(lambda what: (seen.append(what), done.set()), watched)
        os.kill(runner.pid, signal.SIGTERM)  # the runner alone, as `kill <pid>` does
        runner.wait(timeout=10)
        assert done.wait(timeout=5)
        assert seen == [f"deepspeed (pid {runner.pid})"]
        assert gone(watched) == f"deepspeed (pid {runner.pid})"
    finally:
        os.killpg(runner.pid, signal.SIGKILL)


def test_a_process_without_a_launcher_watches_nothing():
    assert launcher_processes() == []  # pytest's parent is no launcher
    started = time.perf_counter()
    watch_launcher(lambda what: pytest.fail("nothing to watch"), [])
    assert time.perf_counter() - started < 1.0
