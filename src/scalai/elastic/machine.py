"""One machine's workers: started from standbys, with torchrun's environment, watched.

The agent takes torchrun's role for its machine's workers (there is no torchrun process):
for a generation it is told which global ranks run here, the world size and the
rendezvous store (a c10d ``TCPStore`` the coordinator holds for that generation), and it
starts one worker per rank with the environment torchrun would give it (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE=True``: every rank, rank 0 too, is a
client of that store), so ``init_process_group()`` works unchanged. The coordinator
assigns ranks, so hosts need no particular address order.

Workers come from a :class:`StandbyPool` (already started processes, see
:mod:`.standby`); a used standby is replaced in the background, once the workers it
became have trained their first step (:meth:`Workers.starting`): starting an interpreter
and importing torch costs seconds of CPU, which would otherwise come out of the old
workers' last step, the save and the new workers' build and first step. Their files stay on this
machine: ``RUN/events/gNNN/`` (reports), ``RUN/control/`` (stop, free, go, abort),
``RUN/metrics/gNNN.jsonl``, ``LOGS/gNNN-rankR.log``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .standby import assignment

__all__ = ["StandbyPool", "Workers", "Worker", "interface_for", "route_address", "kill_tree", "die_with_parent_preexec"]


def interface_for(address: str) -> str | None:
    """The name of this machine's network interface holding IPv4 ``address`` (Linux), for
    ``GLOO_SOCKET_IFNAME``; ``lo`` for loopback addresses; None when not found."""
    if address.startswith("127.") or address in ("localhost", "::1"):
        return "lo"
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name in names:
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    finally:
        probe.close()
    return None


def route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 9))
        return s.getsockname()[0]


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal ``proc`` and its process group (workers start their own session)."""
    if proc.poll() is not None:
        return
    for target in (lambda: os.killpg(proc.pid, sig), lambda: os.kill(proc.pid, sig)):
        try:
            target()
            return
        except (ProcessLookupError, PermissionError):
            continue


def die_with_parent_preexec() -> None:
    """``preexec_fn`` of a child that must die with this process (Linux parent-death signal).

    The signal comes when the *thread* that started the child ends, so children are
    started from threads that live as long as the agent."""
    import ctypes

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class StandbyPool:
    """Up to ``size`` started worker processes waiting for an assignment (see :mod:`.standby`).

    One thread of the pool's own, alive as long as the pool, starts them (a child's
    parent-death signal is tied to the thread that started it).

    Args:
        trainer: the trainer's JSON (what a standby warms up).
        env: their environment (an assignment adds to it).
        log_dir: where a standby's output goes until it is assigned.
        size: how many to keep (0: none; workers then start cold, as with torchrun).
        cwd: their working directory (the agent's run directory).

    The first ``size`` standbys start at normal priority (the agent joins with one warm).
    A used standby is replaced at once, with its imports at the lowest CPU priority
    (``--background``, see :mod:`.standby`): they take only idle CPU time from the workers
    and stores of a busy machine, yet are ready for the next change as soon as the machine
    has time (one assigned before it is ready restarts at normal priority). A standby that
    :meth:`take` asks for when none is ready starts at normal priority: a worker waits for it.
    """

    def __init__(self, trainer: dict, env: dict[str, str], log_dir: Path, size: int, cwd: Path | None = None):
        import json

        self.cmd = [sys.executable, "-m", "scalai.elastic.standby", json.dumps(trainer)]
        self.env, self.log_dir, self.size, self.cwd = env, Path(log_dir), size, cwd
        self._ready: list[subprocess.Popen] = []
        self._cv = threading.Condition()
        self._wanted: list[list] = []  # [slot for the process, done event] asked for by take()
        self._count = 0
        self._closed = False
        self._refill = size > 0
        self._thread = threading.Thread(target=self._loop, name="scalai-standby", daemon=True)
        self._thread.start()

    def _start(self, background: bool) -> subprocess.Popen:
        self._count += 1
        log = open(self.log_dir / f"standby-{self._count}.log", "ab")
        try:
            proc = subprocess.Popen(self.cmd + ["--background"] * background, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    env=self.env, cwd=self.cwd, start_new_session=True,
                                    preexec_fn=die_with_parent_preexec)
        finally:
            log.close()
        os.set_blocking(proc.stdout.fileno(), False)
        proc.warm = False
        proc.log = self.log_dir / f"standby-{self._count}.log"  # its output until it is assigned
        return proc

    @staticmethod
    def _is_warm(proc: subprocess.Popen) -> bool:
        """Whether ``proc`` said it is ready (imports done), without waiting."""
        if not proc.warm:
            try:
                proc.warm = b"ready" in (proc.stdout.read() or b"")
            except (OSError, ValueError):
                pass
        return proc.warm

    def _loop(self) -> None:
        quick_deaths, last_start = 0, 0.0
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or self._wanted or (
                    self._refill and len([p for p in self._ready if p.poll() is None]) < self.size), timeout=1.0)
                if self._closed:
                    return
                died = [p for p in self._ready if p.poll() is not None]
                self._ready = [p for p in self._ready if p.poll() is None]
                wanted = self._wanted.pop(0) if self._wanted else None
                if wanted is None and len(self._ready) >= self.size:
                    continue
            # Standbys that die right after they start (a broken environment) are not
            # started again and again: after three in a row the pool stops refilling.
            quick_deaths = quick_deaths + len(died) if died and time.monotonic() - last_start < 30 else 0
            if wanted is None and (quick_deaths >= 3 or not self._refill):
                self._refill = False
                continue
            last_start = time.monotonic()
            proc = self._start(background=wanted is None and self._count >= self.size)  # outside the lock: take() of a ready one need not wait
            with self._cv:
                if wanted is not None:
                    wanted[0] = proc
                    self._cv.notify_all()
                else:
                    self._ready.append(proc)

    def take(self) -> subprocess.Popen:
        """A started standby (or one started now, when none is ready); the pool refills
        in the background."""
        with self._cv:
            self._ready = [p for p in self._ready if p.poll() is None]
            if self._ready:
                warm = [p for p in self._ready if self._is_warm(p)]
                proc = (warm or self._ready)[0]
                self._ready.remove(proc)
                proc.stdout.close()  # it writes to its log from now on
                self._cv.notify_all()
                return proc
            wanted: list = [None]
            self._wanted.append(wanted)
            self._cv.notify_all()
            self._cv.wait_for(lambda: wanted[0] is not None or self._closed)
            if wanted[0] is None:
                raise RuntimeError("the agent is shutting down")
            wanted[0].stdout.close()
            return wanted[0]

    def warm(self) -> int:
        """Standbys ready to be assigned (their imports done)."""
        with self._cv:
            return sum(1 for p in self._ready if p.poll() is None and self._is_warm(p))

    def wait_warm(self, timeout: float) -> bool:
        """Wait until one standby is warm (or none is wanted); False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.size and not self.warm():
            if time.monotonic() > deadline or not self._refill:
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for p in self._ready:
                kill_tree(p)
            self._ready = []
            self._cv.notify_all()


@dataclass
class Worker:
    generation: int
    rank: int
    proc: subprocess.Popen
    log: Path
    reported: bool = False


class Workers:
    """The workers this agent runs, keyed by ``(generation, rank)``."""

    def __init__(self, pool: StandbyPool, run_dir: Path, log_dir: Path):
        self.pool, self.run_dir, self.log_dir = pool, Path(run_dir), Path(log_dir)
        self.workers: dict[tuple[int, int], Worker] = {}
        self._lock = threading.Lock()
        for sub in ("events", "control", "metrics"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)

    def metrics_file(self, generation: int) -> Path:
        return self.run_dir / "metrics" / f"g{generation:03d}.jsonl"

    def launch(self, generation: int, ranks: list[int], module: str, argv: list[str], env: dict[str, str]) -> None:
        """Start the workers of ``ranks`` (``env``: the generation's; per rank, ``RANK``...
        are filled in from ``ranks``' order as local ranks)."""
        (self.run_dir / "events" / f"g{generation:03d}").mkdir(parents=True, exist_ok=True)
        for local, rank in enumerate(ranks):
            log = self.log_dir / f"g{generation:03d}-rank{rank}.log"
            proc = self.pool.take()
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(local), "ROLE_RANK": str(rank),
                        "LOCAL_WORLD_SIZE": str(len(ranks))}
            try:
                proc.stdin.write(assignment(module, argv, rank_env, str(self.run_dir), str(log)))
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass  # it died meanwhile: its exit is reported like any worker's
            with self._lock:
                self.workers[(generation, rank)] = Worker(generation, rank, proc, log)

    def exits(self) -> list[tuple[int, int, int]]:
        """``(generation, rank, code)`` of workers that ended since the last call."""
        out = []
        with self._lock:
            for w in self.workers.values():
                code = w.proc.poll()
                if code is not None and not w.reported:
                    w.reported = True
                    out.append((w.generation, w.rank, code))
        return out

    def kill(self, generation: int | None = None, ranks=None) -> None:
        """SIGKILL the workers of ``generation`` (``ranks``: only these; None: every worker)."""
        with self._lock:
            targets = [w for w in self.workers.values() if (generation is None or w.generation == generation)
                       and (ranks is None or w.rank in ranks)]
        for w in targets:
            kill_tree(w.proc)

    def finished(self) -> list[int]:
        """Generations whose workers here have all exited and been reported."""
        with self._lock:
            gens: dict[int, bool] = {}
            for (g, _), w in self.workers.items():
                gens[g] = gens.get(g, True) and w.reported
        return [g for g, done in gens.items() if done]

    def running(self) -> list[tuple[int, int]]:
        with self._lock:
            return [k for k, w in self.workers.items() if w.proc.poll() is None]

    def forget(self, generation: int) -> None:
        with self._lock:
            for key in [k for k in self.workers if k[0] == generation and self.workers[k].reported]:
                del self.workers[key]

    def tail(self, generation: int, rank: int, lines: int = 40) -> str:
        """The end of a worker's output (its standby's, if it died before its assignment)."""
        w = self.workers.get((generation, rank))
        text: list[str] = []
        for path in (w.log, getattr(w.proc, "log", None)) if w else ():
            try:
                text = path.read_text(errors="replace").splitlines() if path else []
            except OSError:
                continue
            if text:
                break
        keep = [t for t in text if "Warning" not in t and "warnings.warn" not in t]
        return "\n".join(keep[-lines:])
