"""A stop request that every rank sees at the same step.

Requests come from outside the training loop: a signal delivered to any worker
(``SIGTERM`` from a scheduler or torchrun, ``SIGUSR1`` by hand), a file that appears
(``touch STOP``), or code (:meth:`StopFlag.request`). Checking locally costs a flag test
and one ``stat``; agreeing costs one ``all_reduce`` of one integer (MAX over the group),
so that all ranks leave the loop after the same step and can save together.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Iterable

__all__ = ["StopFlag", "DEFAULT_SIGNALS"]

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Poll with :meth:`should_stop` once per step on every rank.

    Args:
        path: a file whose existence requests a stop (``None``: no file). With ranks on
            several hosts, one host seeing it is enough.
        signals: signals that request a stop on the rank that receives them (handlers are
            installed only in the main thread; the previous handlers come back with
            :meth:`close`).
        group: process group to agree in (``None``: the default group; without an
            initialized process group the flag is local).
    """

    def __init__(self, path: str | os.PathLike | None = None,
                 signals: Iterable[int] = DEFAULT_SIGNALS, group: Any = None):
        self.path = os.fspath(path) if path is not None else None
        self.group = group
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request(f"signal {signal.Signals(signum).name}")

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop from this rank (takes effect at the next :meth:`should_stop`)."""
        if self.reason is None:
            self.reason = reason

    def local(self) -> bool:
        """Whether this rank has a request (no communication)."""
        if self.reason is None and self.path is not None and os.path.exists(self.path):
            self.request(f"file {self.path}")
        return self.reason is not None

    def should_stop(self) -> bool:
        """Whether any rank has a request; the same answer on every rank (collective)."""
        import torch
        import torch.distributed as dist

        flag = int(self.local())
        if not dist.is_available() or not dist.is_initialized():
            return bool(flag)
        device = "cpu"
        if dist.get_backend(self.group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        box = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.group)
        if box.item() and self.reason is None:
            self.reason = "requested on another rank"
        return bool(box.item())

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
