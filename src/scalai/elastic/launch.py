"""Starting the workers: one torchrun agent per host, joined by a c10d rendezvous.

The runner never starts worker processes itself. For every host of an allocation it starts
``python -m torch.distributed.run`` (an *agent*) with ``--nnodes`` = hosts, its share of
ranks as ``--nproc-per-node``, and the c10d rendezvous backend on a TCP store the runner
holds for the whole run (``--rdzv-conf is_host=false``: no agent hosts it, so an agent's
death does not take the rendezvous with it). Each launch is a new rendezvous id.

torchrun numbers the agents in the sorted order of their ``--local-addr`` and gives each
agent's workers consecutive ranks, so the address decides which ranks a host gets. On one
machine the runner gives slot ``s`` the loopback address ``127.0.0.<10+s>`` (all of
127.0.0.0/8 reaches this machine); on real hosts use their addresses, listed so that
their sorted order is the slot order. Workers check it (``ElasticWorker.ready``).

Agents run in their own session; torchrun starts each worker in a session of its own, so
:meth:`Agent.kill` finds the workers as the agent's descendants and signals them too (and
every elastic worker dies with its agent: ``ElasticWorker.started`` sets the parent-death
signal on Linux).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Agent", "Rendezvous", "agent_command", "slot_address", "start_agents", "descendants"]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), from /proc; empty where there is none."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return []
    for name in entries:
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie waiting for its parent counts: it
    holds no memory and no device)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False


def slot_address(slot: int) -> str:
    """The loopback address of host slot ``slot`` on one machine (sorts in slot order)."""
    if not 0 <= slot < 90:
        raise ValueError(f"slot {slot}: one machine simulates at most 90 hosts")
    return f"127.0.0.{10 + slot}"


def agent_command(nnodes: int, nproc: int, endpoint: str, run_id: str, local_addr: str,
                  module: str, args: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torchrun command line of one host's agent (pure)."""
    return [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_id,
            "--rdzv-conf", "is_host=false", "--local-addr", local_addr, "--max-restarts", "0",
            "--monitor-interval", "0.1", "--module", module, *args]


class Rendezvous:
    """The c10d rendezvous store, held by the runner (``endpoint`` = ``host:port``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        from torch.distributed import TCPStore

        self._store = TCPStore(host, port, is_master=True, wait_for_workers=False)
        self.endpoint = f"{host}:{self._store.port}"

    def close(self) -> None:
        self._store = None


@dataclass
class Agent:
    """One host's torchrun agent."""

    host: str
    nproc: int
    proc: subprocess.Popen
    log: Path

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the agent and every worker it started. torchrun starts each worker in a
        session of its own, so the workers are found as the agent's descendants first."""
        if self.proc.poll() is not None:
            return
        workers = descendants(self.proc.pid)
        for pid in [self.proc.pid, *workers]:
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [t for t in text if "Warning" not in t and "warnings.warn" not in t]
        return "\n".join(keep[-lines:])


def start_agents(hosts: Sequence[str], local_sizes: Sequence[int], endpoint: str, run_id: str,
                 module: str, args: Sequence[str], env: dict[str, str], host_env: dict[str, dict[str, str]],
                 log_dir: Path, addresses: Sequence[str] | None = None) -> list[Agent]:
    """Start one agent per host (slot order), each with its own environment and log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    agents = []
    for slot, (host, nproc) in enumerate(zip(hosts, local_sizes)):
        addr = addresses[slot] if addresses else slot_address(slot)
        cmd = agent_command(len(hosts), nproc, endpoint, run_id, addr, module, args)
        log = log_dir / f"{run_id}-{host}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, **host_env.get(host, {})}, start_new_session=True)
        agents.append(Agent(host, nproc, proc, log))
    return agents
