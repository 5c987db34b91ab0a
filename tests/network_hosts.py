"""Two test hosts on this machine: network namespaces joined by a veth pair, one address each, and each
with its own hostname (a UTS namespace), so that a job launched once per host only meets its peer over
the network, as on two nodes. Created and removed by the tests; skipped where the process may not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class TestHost:
    __test__ = False  # not a pytest test class

    namespace: str
    interface: str
    address: str
    hostname: str

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host: its network namespace, its hostname."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "sh", "-c",
                f'hostname {self.hostname} && exec "$@"', "sh", *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=60)


class TwoHosts:
    """host0 and host1 at 10.<a>.<b>.1 and .2 on a veth link, created on enter and removed on exit."""

    def __init__(self) -> None:
        tag = os.getpid() % 10_000
        subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.hosts = [TestHost(f"adx{tag}h{i}", f"adx{tag}v{i}", f"{subnet}.{i + 1}", f"testhost{i}")
                      for i in range(2)]

    def __enter__(self) -> list[TestHost]:
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            pytest.skip("two test hosts need iproute2's ip and util-linux's unshare")
        try:
            _ip("netns", "add", self.hosts[0].namespace)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot create network namespaces here ({error.stderr.strip() or error}); "
                        "the multi-node tests need CAP_NET_ADMIN and CAP_SYS_ADMIN (root in CI)")
        try:
            a, b = self.hosts
            _ip("netns", "add", b.namespace)
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for host in self.hosts:
                _ip("link", "set", host.interface, "netns", host.namespace)
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface)
                _ip("-n", host.namespace, "link", "set", host.interface, "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self.hosts

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            kill_all_in(host)
            # The veth goes with the namespace.
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, timeout=60)


def kill_all_in(host: TestHost) -> None:
    """SIGKILL every process left in the host (a killed launcher's orphaned ranks)."""
    for pid in processes_in(host, ""):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_in(host: TestHost, needle: str) -> list[int]:
    """PIDs inside the host's network namespace whose command line contains `needle`."""
    listed = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True,
                            timeout=60).stdout.split()
    found = []
    for pid in listed:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(pid))
    return found
