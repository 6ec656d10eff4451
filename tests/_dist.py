"""Run a function on N local processes joined in a gloo process group (CPU), never hanging.

``run_ranks(path, "func", world_size)`` starts ``world_size`` Python processes; each joins a
gloo group over a free TCP port on 127.0.0.1, imports the file at ``path`` and calls
``func(rank, world_size, **kwargs)``. What every rank returns (JSON-able) comes back as a list
indexed by rank. A rank that raises makes the whole run fail with every failing rank's
traceback; the other ranks are stopped, and the run as a whole is stopped at ``timeout``.

The ranks are forked from a server process that imported torch and ``torch.distributed``
once (``multiprocessing``'s forkserver, started with ``OMP_NUM_THREADS=1`` so that it has a
single thread when it forks): a rank then starts in milliseconds instead of the seconds an
interpreter takes to import torch, which most multi-process tests would otherwise spend
over and over. Each rank still gets a fresh copy of that server (nothing of one test leaks
into the next), its own environment and its own log. ``SCALAI_TEST_FORK=0`` starts every
rank as a new interpreter instead.

Run as a script, this file is the worker: ``python _dist.py PATH FUNC OUT_DIR``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["run_ranks", "free_port", "DistRunError"]

# After one rank fails, the others may wait forever in a collective; give them this long.
_GRACE_S = 5.0


class DistRunError(AssertionError):
    """One or more ranks failed or the run timed out (an AssertionError so pytest shows it)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(path: str | os.PathLike, func: str, world_size: int, *, timeout: float = 120.0,
              kwargs: dict[str, Any] | None = None) -> list[Any]:
    """Run ``func`` from the file ``path`` on ``world_size`` processes; return their results."""
    with tempfile.TemporaryDirectory(prefix="scalai-dist-") as tmp:
        out = Path(tmp)
        (out / "kwargs.json").write_text(json.dumps(kwargs or {}))
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
                   GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   PYTHONUNBUFFERED="1")
        procs = []
        logs = []
        try:
            for rank in range(world_size):
                rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                if os.environ.get("SCALAI_TEST_FORK", "1") != "0":
                    procs.append(_Forked(str(Path(path).resolve()), func, str(out), rank_env,
                                         str(out / f"rank{rank}.log")))
                    continue
                log = open(out / f"rank{rank}.log", "w")
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, str(Path(path).resolve()), func, str(out)],
                    env=rank_env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            failed_at = None
            while any(p.poll() is None for p in procs):
                now = time.monotonic()
                if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                    failed_at = now
                if now > deadline or (failed_at is not None and now - failed_at > _GRACE_S):
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        problems = []
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                tail = (out / f"rank{rank}.log").read_text()[-4000:]
                why = "was stopped (timeout or another rank failed)" if p.returncode < 0 else \
                    f"exited with {p.returncode}"
                problems.append(f"--- rank {rank} {why}:\n{tail}")
        if problems:
            raise DistRunError(f"{func} on {world_size} ranks failed:\n" + "\n".join(problems))
        return [json.loads((out / f"result{rank}.json").read_text()) for rank in range(world_size)]


class _Forked:
    """A rank forked from the server that preloaded torch, with ``Popen``'s ``poll``,
    ``kill``, ``wait`` and ``returncode`` (negative: killed by that signal)."""

    _started = False

    def __init__(self, path: str, func: str, out: str, env: dict, log: str):
        ctx = multiprocessing.get_context("forkserver")
        if not _Forked._started:  # the server inherits our environment once: one thread in it
            ctx.set_forkserver_preload(["torch", "torch.distributed"])
            saved = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            try:
                from multiprocessing import forkserver

                forkserver.ensure_running()
            finally:
                if saved is None:
                    del os.environ["OMP_NUM_THREADS"]
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
            _Forked._started = True
        self._proc = ctx.Process(target=_forked_main, args=(path, func, out, env, log), daemon=False)
        self._proc.start()

    def poll(self) -> int | None:
        return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def kill(self) -> None:
        self._proc.kill()

    def wait(self) -> int:
        self._proc.join()
        return self._proc.exitcode


def _forked_main(path: str, func: str, out: str, env: dict, log: str) -> None:
    """A forked rank: its log on stdout and stderr, its environment, then :func:`_worker`."""
    sys.stdout.flush(), sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)  # what a killed rank printed last is kept
    os.environ.clear()
    os.environ.update(env)
    _worker(path, func, out)
    sys.stdout.flush(), sys.stderr.flush()


def _worker(path: str, func: str, out: str) -> None:
    import importlib.util
    from datetime import timedelta

    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = json.loads(Path(out, "kwargs.json").read_text())
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        spec = importlib.util.spec_from_file_location(f"_dist_target_{rank}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        result = getattr(module, func)(rank, world_size, **kwargs)
        Path(out, f"result{rank}.json").write_text(json.dumps(result))
    finally:
        import gc

        gc.collect()  # free gloo work objects now, or gloo may abort the process at exit
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
