"""Persistent copies of committed versions, made in the background.

The stores keep the job's state in host memory: fast, but gone with the host. Every time a
new version is committed (a periodic save of the workers, or the result of a
transformation) the runner hands it to the :class:`Persister`, whose thread pulls it from
the stores into ``ROOT/step-NNNNNN`` (a checkpoint directory, written atomically: data
first, manifest last, renamed into place; or, with ``ROOT`` an fsspec URL such as
``s3://BUCKET/run``, objects under that prefix, the manifest written last). Training never waits for it: the workers' save
was a copy into their own host's memory, and the pull reads from the stores' memory while
training goes on. Only the newest submitted version is pulled (an older one still waiting is
skipped), and only the newest ``keep`` copies stay on disk.

When a host dies and no replica holds its bytes, :meth:`Persister.latest` is where the job
restarts from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Persister", "Persisted"]


@dataclass(frozen=True)
class Persisted:
    version: str
    step: int
    path: Path | str
    seconds: float
    bytes: int


class Persister:
    """Background pulls of committed versions into checkpoint directories under ``root``.

    Args:
        urls: a callable returning the stores that are alive now (slot order irrelevant).
        job: the job's name in the stores.
        root: where the checkpoints go (a directory, or a URL: ``s3://BUCKET/PREFIX``).
        token / tls: the stores' token and TLS setting (:class:`~scalai.tls.Tls`).
        keep: how many copies to keep on disk.
    """

    def __init__(self, urls: Callable[[], Sequence[str]], job: str, root: str | Path, token: str | None = None,
                 keep: int = 2, on_error: Callable[[str], None] | None = None, tls=None):
        from ..checkpoint.objects import is_object_url

        self.urls, self.job, self.token, self.keep, self.tls = urls, job, token, keep, tls
        self.root = str(root) if is_object_url(str(root)) else Path(root)
        if isinstance(self.root, Path):
            self.root.mkdir(parents=True, exist_ok=True)
        self.on_error = on_error or (lambda message: None)
        self.done: list[Persisted] = []
        self.busy: str | None = None
        self._pending: tuple[str, int] | None = None
        self._held = False
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scalai-persist", daemon=True)
        self._thread.start()

    def submit(self, version: str, step: int) -> None:
        """Persist ``version`` (of ``step``) when the thread is free; replaces a waiting one.
        A step already copied is not copied again (a version made from it, e.g. the same
        state transformed into another layout, holds the same state; pulling it again would
        first delete the copy that exists)."""
        with self._cv:
            if any(d.step == step for d in self.done):
                return
            self._pending = (version, step)
            self._cv.notify()

    def hold(self, held: bool = True) -> None:
        """While held, no new copy starts (one under way goes on): the runner holds the
        copies during a reconfiguration, whose downtime they would lengthen by competing for
        the CPU and the stores, and releases them after the first step in the new layout."""
        with self._cv:
            self._held = held
            self._cv.notify_all()

    def in_use(self) -> set[str]:
        """Versions being pulled or waiting to be: the stores must keep them."""
        with self._cv:
            return {v for v in (self.busy, self._pending[0] if self._pending else None) if v}

    def latest(self) -> Persisted | None:
        with self._cv:
            return self.done[-1] if self.done else None

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Release a hold, then wait until nothing is pending or being pulled (tests and
        the end of a run)."""
        self.hold(False)
        with self._cv:
            return self._cv.wait_for(lambda: self._pending is None and self.busy is None, timeout)

    def _loop(self) -> None:
        import time

        from ..locations import delete, exists, open_source
        from ..store import StoreCluster, pull
        from ..training.checkpoints import step_dir

        while True:
            with self._cv:
                self._cv.wait_for(lambda: (self._pending is not None and not self._held) or self._closed)
                if self._closed:
                    return
                version, step = self._pending
                self._pending, self.busy = None, version
            t0 = time.perf_counter()
            out = step_dir(self.root, step)
            try:
                if exists(out):
                    delete(out)
                cluster = StoreCluster(list(self.urls()), self.token, tls=self.tls)
                pull(cluster, self.job, str(out), version)
                with open_source(out) as copy:
                    nbytes = sum(r.nbytes for r in copy.manifest.ranks)
                record = Persisted(version, step, out, time.perf_counter() - t0, nbytes)
            except Exception as exc:  # noqa: BLE001 - reported; the stores still hold the version
                self.on_error(f"persistent copy of {version} (step {step}) failed: {exc}")
                record = None
            with self._cv:
                if record is not None:
                    self.done.append(record)
                    for old in self.done[:-self.keep]:
                        try:
                            delete(old.path)
                        except Exception as exc:  # noqa: BLE001 - reported; the copy stays
                            self.on_error(f"removing the old copy {old.path} failed: {exc}")
                    self.done = self.done[-self.keep:]
                self.busy = None
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
