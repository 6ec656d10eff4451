"""The run's metrics and its live progress line.

Rank 0 of every generation appends one JSON line per step to ``RUN_DIR/workers/metrics.jsonl``
(the trainer's ``--metrics`` format). The runner follows that file (:class:`MetricsTail`),
turns each line into a row of ``RUN_DIR/metrics.jsonl`` (:func:`run_row`: ``samples`` is the
list of sample ids the data-parallel ranks fed their models in that step, as they reported
them) and prints a progress line (:class:`Progress`).

When a failure costs steps (the job restarts from an older committed version), those steps
run again; the first rows of a step are then marked ``"lost": true`` by
:func:`mark_lost`, so that the rows without the mark are the job's one trajectory, in which
every sample is read exactly once.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterable, TextIO

__all__ = ["MetricsTail", "run_row", "mark_lost", "Progress", "effective_rows", "sample_counts"]


class MetricsTail:
    """New complete JSON lines of a growing file, from where the last call stopped."""

    def __init__(self, path: str | Path):
        self.path, self.offset = Path(path), 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a torn last line waits for the next call
        self.offset += end
        rows = []
        for line in data[:end].splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows


def run_row(worker_row: dict, generation: int) -> dict:
    """A row of ``RUN_DIR/metrics.jsonl`` from a trainer metrics row (pure). ``samples``
    are the ids the ranks reported feeding their models (``sample_ids``, see
    :func:`scalai.training.gather_fed`; empty if the script reported none), ``fed_mismatch``
    the ranks of a replica that fed other rows than the replica's first rank."""
    row = {"step": worker_row["step"], "loss": worker_row["loss"], "layout": worker_row["layout"],
           "samples": worker_row.get("sample_ids", []), "consumed": worker_row.get("samples"),
           "step_time": worker_row.get("step_time"), "lr": worker_row.get("lr"),
           "time": worker_row.get("time"), "generation": generation}
    if worker_row.get("fed_mismatch"):
        row["fed_mismatch"] = worker_row["fed_mismatch"]
    return row


def mark_lost(rows: Iterable[dict]) -> list[dict]:
    """Rows with ``lost: true`` on every row whose step ran again later (pure)."""
    rows = [dict(r) for r in rows]
    last = {r["step"]: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        if last[r["step"]] != i:
            r["lost"] = True
        else:
            r.pop("lost", None)
    return rows


def effective_rows(rows: Iterable[dict]) -> list[dict]:
    """The job's trajectory: rows not marked lost, by step."""
    return sorted((r for r in rows if not r.get("lost")), key=lambda r: r["step"])


def sample_counts(rows: Iterable[dict]) -> dict[int, int]:
    """How often each sample id was read by the effective rows."""
    counts: dict[int, int] = {}
    for r in effective_rows(rows):
        for s in r["samples"]:
            counts[s] = counts.get(s, 0) + 1
    return counts


class Progress:
    """One status line: rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, total_steps: int, out: TextIO | None = None, every: float = 5.0):
        self.total, self.out, self.every = total_steps, out or sys.stdout, every
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self._last_print = 0.0
        self._times: list[tuple[float, int]] = []  # (time, samples in the step)
        self._line = ""

    def step(self, row: dict, note: str = "") -> None:
        now = time.time()
        self._times = [(t, n) for t, n in self._times if now - t < 10.0] + [(now, len(row["samples"]))]
        span = self._times[-1][0] - self._times[0][0]
        if span > 0:
            rate = f"{sum(n for _, n in self._times[1:]) / span:.1f}"
        else:  # the first step seen: its own time, if the worker reported it
            rate = f"{len(row['samples']) / row['step_time']:.1f}" if row.get("step_time") else "-"
        self._line = (f"step {row['step']}/{self.total}  loss {row['loss']:.4f}  {row['layout']}  "
                      f"{rate} samples/s{('  ' + note) if note else ''}")
        if self.tty:
            self.out.write("\r\033[K" + self._line)
            self.out.flush()
        elif now - self._last_print >= self.every or row["step"] == self.total:
            self._last_print = now
            self.out.write(self._line + "\n")
            self.out.flush()

    def say(self, text: str) -> None:
        """A message on its own line (the progress line comes back with the next step)."""
        if self.tty and self._line:
            self.out.write("\r\033[K")
        self.out.write(text + "\n")
        self.out.flush()
