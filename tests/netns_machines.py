"""Simulated machines with real isolation, for the multi-machine tests and the downtime
benchmark across machines (root, iproute2).

Each machine is

- a **network namespace** with its own address on a bridge in the root namespace (a veth
  pair, ``tc`` token-bucket filters on both ends limiting it to ``link`` each way, like a
  NIC), so the coordinator in the root namespace and the other machines reach it only
  over that link, and a machine can be cut off (its veth down) or frozen;
- a **mount namespace** with private tmpfs mounted over the test's directory and over
  ``/dev/shm``: the agent's root, its store and its data copy live there, invisible to the
  coordinator and to the other machines; the coordinator's run directory (in the test's
  directory) is invisible to the machine. Any hidden use of a shared filesystem fails.

The agent is started with the CLI, as a user would (``scalai agent --join ...``); any
other program (a torchrun agent, a storage server) with :meth:`Machines.spawn`. Names
carry ``name`` (``elastic-agents`` by default) where the kernel allows (namespaces, tmpfs
sources); interface names are limited to 15 characters and carry ``ea`` and this
process's id. :meth:`Machines.close` (or leaving a ``with`` block) kills every process of
every machine (their private mounts go with their mount namespaces) and deletes every
namespace and link it made.

It lives beside ``s3_server.py`` in ``tests/``: infrastructure both the tests and
``benchmarks/`` use (the benchmarks put ``tests/`` on their path), not part of the library.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SCALAI = str(Path(sys.executable).parent / "scalai")


def available() -> bool:
    """Root with ``ip``, ``tc`` and ``unshare``, and a namespace can be made here."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "unshare")):
        return False
    probe = f"elastic-agents-probe-{os.getpid()}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return out


def _free_subnet() -> int:
    used = _run("ip", "-4", "-o", "addr", check=False).stdout
    for k in [*range(os.getpid() % 200 + 20, 250), *range(20, 250)]:
        if f"10.251.{k}." not in used:
            return k
    raise RuntimeError("no free 10.251.X.0/24 subnet")


class Machines:
    """Up to ``capacity`` machines on one bridge (see the module docstring).

    Args:
        private: the directory hidden behind each machine's tmpfs (the test's directory;
            machine ``i``'s agent root is ``private/machine-i`` inside its own tmpfs).
        link: each machine's link rate each way (``tc`` syntax, e.g. ``1gbit``).
    """

    def __init__(self, private: Path, capacity: int = 4, link: str = "1gbit", name: str = "elastic-agents"):
        self.private, self.capacity, self.link, self.name = Path(private), capacity, link, name
        self.tag = f"ea{os.getpid() % 100000}"
        self.subnet = _free_subnet()
        self.bridge = f"{self.tag}br"
        self.procs: dict[int, subprocess.Popen] = {}  # the agents, by machine
        self.spawned: list[subprocess.Popen] = []  # every process started here
        self.made: list[int] = []
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self.bridged = True
        _run("ip", "addr", "add", f"{self.coordinator_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    @property
    def coordinator_address(self) -> str:
        return f"10.251.{self.subnet}.254"

    def address(self, i: int) -> str:
        return f"10.251.{self.subnet}.{i + 1}"

    def netns(self, i: int) -> str:
        return f"{self.name}-{os.getpid()}-m{i}"

    def veth(self, i: int) -> tuple[str, str]:
        return f"{self.tag}v{i}", f"{self.tag}p{i}"  # bridge side, machine side

    def _make(self, i: int) -> None:
        ns, (vb, vm) = self.netns(i), self.veth(i)
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", vb, "type", "veth", "peer", "name", vm)
        _run("ip", "link", "set", vm, "netns", ns)
        _run("ip", "link", "set", vb, "master", self.bridge)
        _run("ip", "link", "set", vb, "up")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", vm)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", vm, "up")
        for dev, prefix in ((vb, ()), (vm, ("ip", "netns", "exec", ns))):
            _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.link, "burst", "256kb",
                 "latency", "100ms")
        self.made.append(i)

    def spawn(self, i: int, command: str, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        """Run the shell command ``command`` on machine ``i`` (made on first use): in its
        network namespace, in a mount namespace of its own with private tmpfs over
        ``private`` and ``/dev/shm``; ``env``: its environment; output appended to ``log``."""
        if i not in self.made:
            self._make(i)
        script = (f"mount -t tmpfs -o size=4g {self.name}-m{i} {self.private} && "
                  f"mount -t tmpfs -o size=4g {self.name}-shm-m{i} /dev/shm && exec {command}")
        cmd = ["ip", "netns", "exec", self.netns(i), "unshare", "--mount", "--propagation", "private",
               "sh", "-c", script]
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env or os.environ, start_new_session=True)
        if log:
            out.close()
        self.spawned.append(proc)
        return proc

    def start(self, i: int, join: str, token: str, devices: int = 1, log: Path | None = None,
              extra: tuple[str, ...] = (), env: dict | None = None) -> subprocess.Popen:
        """Machine ``i``'s agent, named ``m{i}``, joining ``join`` (``HOST:PORT``); ``env``:
        its environment (the token is added)."""
        root = self.private / f"machine-{i}"
        command = (f"mkdir -p {root} && exec {SCALAI} agent --join {join} --name m{i} --root {root} "
                   f"--devices {devices} --address {self.address(i)} {' '.join(extra)}")
        env = {**(env or os.environ), "SCALAI_TOKEN": token, "PYTHONUNBUFFERED": "1"}
        self.procs[i] = self.spawn(i, f"sh -c {shlex.quote(command)}", log, env)
        return self.procs[i]

    def pids(self, i: int) -> list[int]:
        """Every process of machine ``i`` (in its network namespace)."""
        text = _run("ip", "netns", "pids", self.netns(i), check=False).stdout
        return [int(p) for p in text.split()]

    def signal_all(self, i: int, sig: int) -> list[int]:
        """``sig`` to every process of machine ``i`` (SIGSTOP: the machine freezes)."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def terminate(self, i: int) -> None:
        """SIGTERM to machine ``i``'s agent (a planned departure)."""
        self.procs[i].send_signal(signal.SIGTERM)

    def cut(self, i: int) -> None:
        """Cut machine ``i``'s link (its veth down)."""
        _run("ip", "link", "set", self.veth(i)[0], "down")

    def close(self) -> None:
        """Kill every process of every machine, delete every namespace and link made
        (idempotent; a machine's private mounts go with its last process)."""
        for i in list(self.made):
            for _ in range(2):
                self.signal_all(i, signal.SIGCONT)
                self.signal_all(i, signal.SIGKILL)
                time.sleep(0.2)
        for proc in self.spawned:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for i in self.made:
            _run("ip", "link", "del", self.veth(i)[0], check=False)
            _run("ip", "netns", "del", self.netns(i), check=False)
        self.made = []
        if self.bridged:
            _run("ip", "link", "del", self.bridge, check=False)
            self.bridged = False

    def __enter__(self) -> "Machines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
