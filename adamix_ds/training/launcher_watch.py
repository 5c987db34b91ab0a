"""Ranks notice when the launcher the user started is gone, and stop as on SIGTERM.

`kill <pid>`, `docker stop` and Kubernetes send SIGTERM to the one process the user started. mpiexec and srun
forward it to the ranks; DeepSpeed's runner on one node does not: it exits, and its per-node launcher and the
ranks would train on as orphans. So each rank watches the launcher processes above it (Linux /proc): its parent
when that is a known per-node launcher, and above that the runner the user started (deepspeed, mpiexec). When
one of them is gone, the rank asks to stop; the ranks then agree, finish the step, save and exit with 143.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

NODE_LAUNCHERS = ("deepspeed.launcher.launch", "hydra_pmi_proxy", "slurmstepd", "torch.distributed.run", "torchrun")
"""Per-node launchers a rank can be the child of (matched in the parent's command line)."""
RUNNERS = ("deepspeed", "mpiexec", "mpirun", "mpiexec.hydra")
"""The launchers a user starts, above a per-node launcher on the node where the job was started."""
POLL_SECONDS = 1.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a running process; None when it is gone or a zombie (exited, not reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _argv(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


def launcher_processes(pid: int | None = None) -> list[tuple[int, str, str]]:
    """(pid, start time, name) of the launchers above process `pid` (this one by default) whose end means the job's
    launcher is gone; empty without a known launcher or without /proc."""
    me = _stat(pid or os.getpid())
    if me is None:
        return []
    parent = _stat(me[0])
    argv = " ".join(_argv(me[0]))
    name = next((n for n in NODE_LAUNCHERS if n in argv), None)
    if parent is None or name is None:
        return []
    watched = [(me[0], parent[1], name)]
    runner = _stat(parent[0])
    runner_argv = [os.path.basename(a) for a in _argv(parent[0])[:2]]
    user_started = next((r for r in RUNNERS if r in runner_argv), None)
    if runner is not None and user_started is not None:
        watched.append((parent[0], runner[1], user_started))
    return watched


def gone(watched: list[tuple[int, str, str]]) -> str | None:
    """The name and pid of the first watched launcher that no longer runs (pids are not reused unseen: the start
    time must match too)."""
    for pid, started, name in watched:
        now = _stat(pid)
        if now is None or now[1] != started:
            return f"{name} (pid {pid})"
    return None


def watch_launcher(on_gone: Callable[[str], None], watched: list[tuple[int, str, str]] | None = None) -> None:
    """Call on_gone(description) once, from a daemon thread, when a launcher above this rank ends."""
    watched = launcher_processes() if watched is None else watched
    if not watched:
        return

    def poll() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_SECONDS):
            missing = gone(watched)
            if missing is not None:
                on_gone(missing)
                return

    threading.Thread(target=poll, name="launcher-watch", daemon=True).start()
