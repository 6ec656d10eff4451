"""Run a function on N local processes joined in a gloo process group (CPU), never hanging.

``run_ranks(path, "func", world_size)`` starts ``world_size`` Python processes; each joins a
gloo group over a free TCP port on 127.0.0.1, imports the file at ``path`` and calls
``func(rank, world_size, **kwargs)``. What every rank returns (JSON-able) comes back as a list
indexed by rank. A rank that raises makes the whole run fail with every failing rank's
traceback; the other ranks are stopped, and the run as a whole is stopped at ``timeout``.

Run as a script, this file is the worker: ``python _dist.py PATH FUNC OUT_DIR``.
"""

from __future__ import annotations

import json
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
                log = open(out / f"rank{rank}.log", "w")
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, str(Path(path).resolve()), func, str(out)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=log, stderr=subprocess.STDOUT))
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
