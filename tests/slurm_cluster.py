"""A real one-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages, with
state, spool and logs in a temporary directory (installed by .ci/run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from launching import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sacct", "scontrol")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=adamixtest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True, timeout=60).returncode == 0:
        return
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["mungekey", "-c"], check=True, timeout=60)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=60)


def node_state(env: dict) -> str:
    """The test node's state as sinfo prints it (idle, mixed, allocated, completing, ...); '' while slurmctld is down."""
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=60,
                           check=False)
    return state.stdout.strip() if state.returncode == 0 else ""


@contextlib.contextmanager
def single_node_cluster(root: Path):
    """Yield the environment (SLURM_CONF set) of a running one-node cluster; stop it afterwards."""
    _start_munge()
    conf = _write_conf(root)
    env = dict(os.environ, SLURM_CONF=str(conf))
    daemons = [subprocess.Popen([f"/usr/sbin/{d}", "-D", "-f", str(conf)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for d in ("slurmctld", "slurmd")]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if node_state(env) in ("idle", "mixed", "allocated"):
                break
            time.sleep(1)
        else:
            logs = "\n".join((root / "log" / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                             if (root / "log" / f).exists())
            raise RuntimeError(f"the test SLURM cluster did not come up:\n{logs}")
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
