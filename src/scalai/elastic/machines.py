"""How a run's agents come to exist: started here, or joining from other machines.

The run always talks to its agents through the same protocol (:mod:`.coordinator`);
only their origin differs:

- :class:`RemoteMachines` (``scalai run --listen ADDR:PORT --agents N``): agents started
  elsewhere (ssh, SLURM, Kubernetes) join; the run waits for N of them.
- :class:`LocalMachines` (``scalai run --hosts N``, ``scalai demo``): the run starts N agents
  on this machine itself (``scalai agent --join 127.0.0.1:PORT``, each with its own root
  and store in memory), so the one-machine mode exercises the real path.

Either way the schedule's ``fail: HOST`` is carried out by the agent (:meth:`Machines.crash`:
it kills its workers and store, wipes the store's memory and exits without a word).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["Machines", "RemoteMachines", "LocalMachines"]


class Machines:
    """The agents of a run (see the module docstring).

    Attributes:
        expected: agents to wait for before the job starts.
        token: the run's token (agents, stores; None only on loopback without one).
    """

    expected: int = 1
    token: str | None = None

    def start(self, coordinator_url: str) -> None:
        """Begin (the coordinator listens at ``coordinator_url``)."""

    def crash(self, host: str, service) -> None:
        """The schedule's failure of ``host`` (see the module docstring)."""
        service.send(host, "crash")

    def describe(self) -> str:
        return f"{self.expected} agents"

    def close(self) -> None:
        """Stop what :meth:`start` started."""


class RemoteMachines(Machines):
    def __init__(self, expected: int, token: str | None):
        if expected < 1:
            raise ValueError(f"--agents {expected} must be at least 1")
        self.expected, self.token = expected, token

    def describe(self) -> str:
        return f"{self.expected} agents (scalai agent --join ...)"


class LocalMachines(Machines):
    """``hosts`` agents on this machine, named ``host0``... with ``devices`` each.

    Args:
        link: the simulated link between their stores (e.g. ``1gbit``).
        root: where their directories go (default: a new directory in /dev/shm).
        standby: standby workers per agent (default: one per device).
        tls: the agents' TLS options (their stores serve HTTPS with its certificate).
    """

    def __init__(self, hosts: int, devices: int, link: str | None = None, root: str | None = None,
                 standby: int | None = None, tls=None):
        if not 1 <= hosts <= 80:
            raise ValueError(f"--hosts {hosts}: one machine runs 1 to 80 agents")
        self.expected, self.devices, self.link, self.standby, self.tls = hosts, devices, link, standby, tls
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = Path(root or tempfile.mkdtemp(prefix="scalai-run-", dir=base))
        self.token = secrets.token_urlsafe(24)
        self.procs: dict[str, subprocess.Popen] = {}

    def describe(self) -> str:
        link = f", links {self.link}" if self.link else ""
        return f"{self.expected} agents on this machine x {self.devices} devices (a store each{link})"

    def start(self, coordinator_url: str) -> None:
        from .machine import die_with_parent_preexec

        self.root.mkdir(parents=True, exist_ok=True)
        token_file = self.root / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        address = coordinator_url
        for i in range(self.expected):
            name = f"host{i}"
            cmd = [sys.executable, "-m", "scalai.cli", "agent", "--join", address, "--name", name,
                   "--root", str(self.root / name), "--devices", str(self.devices), "--token-file", str(token_file)]
            cmd += self.tls.options() if self.tls else []
            cmd += ["--link", self.link] if self.link else []
            cmd += ["--standby", str(self.standby)] if self.standby is not None else []
            log = open(self.root / f"{name}.log", "ab")
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, preexec_fn=die_with_parent_preexec)
            log.close()

    def agent_log(self, host: str) -> str:
        try:
            return (self.root / f"{host}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # stop now: the run is over
        for name, proc in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if not os.environ.get("SCALAI_KEEP_AGENTS"):
            shutil.rmtree(self.root, ignore_errors=True)
