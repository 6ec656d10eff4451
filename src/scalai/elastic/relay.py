"""What an agent sends the coordinator about its workers, read from their local files.

Workers keep their protocol files on their own machine (:mod:`.worker`, :mod:`.events`):
a report per rank, the PTC they describe, rank 0's metrics rows. :class:`Relay` notices
what changed since its last look (file sizes and modification times; whole JSON objects
only, since workers write them atomically) and :meth:`Relay.collect` returns it as one
report body, in the order the coordinator needs: metrics rows first (a generation's first
row ends a change), then PTCs (an announcement before the mark that says it was made),
then rank reports, then exits. Nothing is lost when a send fails: the body stays pending
and is sent again with what came since (:meth:`Relay.pending`, :meth:`Relay.sent`);
rows carry their step, so the coordinator drops the ones it has. Not thread-safe: the
agent calls it under its lock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .progress import MetricsTail

__all__ = ["Relay"]


class Relay:
    """The local files of the generations this machine runs (``run_dir``: the workers'
    ``SCALAI_RUN_DIR``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._gens: dict[int, dict] = {}
        self._pending: dict[str, list] = {"metrics": [], "ptcs": [], "reports": [], "exits": []}
        self._logs: dict[str, dict[str, str]] = {}
        self.last_step = 0

    def watch(self, generation: int, ranks: list[int], metrics: Path) -> None:
        self._gens[generation] = {"ranks": list(ranks), "tail": MetricsTail(metrics), "seen": {}, "ptcs": set()}

    def forget(self, generation: int) -> None:
        self._gens.pop(generation, None)

    def generations(self) -> list[int]:
        return sorted(self._gens)

    def fenced(self) -> None:
        """The coordinator gave up on every generation here: stop watching them and forget
        what was to be sent about them, except metrics rows (steps that did run: the
        coordinator keeps them, the newest generation's row of a step counting)."""
        self._gens.clear()
        for key in ("ptcs", "reports", "exits"):
            self._pending[key].clear()
        self._logs.clear()

    def exited(self, generation: int, rank: int, code: int, tail: str = "") -> None:
        self._pending["exits"].append([generation, rank, code])
        if tail:
            self._logs.setdefault(str(generation), {})[str(rank)] = tail

    def collect(self) -> None:
        """Look at every watched generation's files; new content joins the pending body."""
        for gen, w in self._gens.items():
            for row in w["tail"].read():
                self._pending["metrics"].append([gen, row])
                self.last_step = max(self.last_step, int(row.get("step", 0)))
            folder = self.run_dir / "events" / f"g{gen:03d}"
            for name, ready in (("layout.json", False), ("ptc.json", True)):
                if name in w["ptcs"]:
                    continue
                obj = _read(folder / name)
                if obj is not None:
                    w["ptcs"].add(name)
                    self._pending["ptcs"].append([gen, ready, obj])
            for rank in w["ranks"]:
                path = folder / f"rank-{rank:05d}.json"
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                key = (st.st_mtime_ns, st.st_size)
                if w["seen"].get(rank) == key:
                    continue
                obj = _read(path)
                if obj is not None:
                    w["seen"][rank] = key
                    self._pending["reports"] = [r for r in self._pending["reports"] if r[:2] != [gen, rank]]
                    self._pending["reports"].append([gen, rank, obj])

    def pending(self) -> dict:
        """The body to send: everything not acknowledged yet (empty lists when nothing)."""
        body = {k: list(v) for k, v in self._pending.items()}
        if self._logs:
            body["logs"] = {g: dict(r) for g, r in self._logs.items()}
        return body

    def sent(self, body: dict) -> None:
        """``body`` (from :meth:`pending`) arrived: forget what it held (by identity: what
        was collected meanwhile stays)."""
        for key, items in self._pending.items():
            done = {id(x) for x in body.get(key, ())}
            items[:] = [x for x in items if id(x) not in done]
        for gen, ranks in body.get("logs", {}).items():
            for rank in ranks:
                self._logs.get(gen, {}).pop(rank, None)
        self._logs = {g: r for g, r in self._logs.items() if r}

    def empty(self) -> bool:
        return not any(self._pending.values()) and not self._logs


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
