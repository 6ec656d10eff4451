"""The devices an agent offers: counted on the machine, checked, and handed to its workers.

``--device cpu`` offers ``--devices N`` (default 1) CPU slots. ``--device cuda`` counts the
GPUs torch sees (``CUDA_VISIBLE_DEVICES`` respected: a scheduler that gives the agent a
subset, as SLURM does, is obeyed) and offers all of them unless ``--devices`` asks for
fewer; the workers get ``SCALAI_DEVICE=cuda`` and ``CUDA_VISIBLE_DEVICES`` naming the
offered GPUs, so a worker's ``LOCAL_RANK`` is its CUDA device index (what torchrun's
workers assume). The agent itself never imports torch: the count comes from a child
Python.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

__all__ = ["Offer", "offer", "cuda_inventory", "worker_env"]

_PROBE = ("import json, torch\n"
          "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
          "mem = min((torch.cuda.get_device_properties(i).total_memory for i in range(n)), default=0)\n"
          "print(json.dumps({'count': n, 'memory_gib': mem / 2**30}))\n")


def cuda_inventory(timeout: float = 120.0) -> tuple[int, float]:
    """``(GPUs torch sees, GiB of the smallest)`` on this machine, from a child Python.

    Raises:
        ValueError: torch cannot be run (the message says what it printed).
    """
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError(f"--device cuda: could not count this machine's GPUs with torch ({exc})") from None
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
        return int(found["count"]), float(found["memory_gib"])
    except (ValueError, IndexError, KeyError, TypeError):
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"--device cuda: could not count this machine's GPUs with torch ({said})") from None


@dataclass(frozen=True)
class Offer:
    """What an agent offers: ``count`` devices of ``kind`` with ``memory_gib`` each (0: unknown)."""

    kind: str
    count: int
    memory_gib: float = 0.0


def offer(kind: str, devices: int | None, memory_gib: float = 0.0, inventory=cuda_inventory) -> Offer:
    """The devices to offer for ``--device kind --devices devices`` (None: all of the
    machine's GPUs for cuda, 1 for cpu).

    Raises:
        ValueError: an unknown kind, no GPU, or more devices asked for than the machine has.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {kind!r} must be cpu or cuda")
    if devices is not None and devices < 1:
        raise ValueError(f"--devices {devices} must be at least 1")
    if kind == "cpu":
        return Offer("cpu", devices or 1, memory_gib)
    count, gib = inventory()
    if count < 1:
        raise ValueError("--device cuda: torch sees no GPU on this machine (check the driver, "
                         "CUDA_VISIBLE_DEVICES and that torch was built with CUDA), or use --device cpu")
    if devices is not None and devices > count:
        raise ValueError(f"--devices {devices} is more than the {count} GPUs torch sees on this machine")
    return Offer("cuda", devices or count, memory_gib or gib)


def worker_env(offered: Offer, environ: Mapping[str, str]) -> dict[str, str]:
    """What the workers' environment adds: ``SCALAI_DEVICE``, and for cuda the offered GPUs
    as ``CUDA_VISIBLE_DEVICES`` (the first ``count`` of those the agent was given)."""
    env = {"SCALAI_DEVICE": offered.kind}
    if offered.kind == "cuda":
        given = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join((given or [str(i) for i in range(offered.count)])[:offered.count])
    return env
