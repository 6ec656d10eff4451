"""What workers tell the runner: one small JSON file per rank and generation.

A *generation* is one launch of the job's workers in one layout; it ends when they stop
for a reconfiguration, finish, or fail. Every worker keeps its report in
``RUN_DIR/events/gNNN/rank-RRRRR.json`` and rewrites it atomically (temporary file,
rename) whenever something happens, so the runner reads whole objects only::

    {"generation": 3, "rank": 1, "host": "host0", "pid": 4242, "layout": "tp=2,pp=1,dp=2",
     "step": 17,                                  # last completed optimizer step
     "times": {"ready": t, "load_start": t, "load_end": t, "first_step": t,
               "save_start": t, "save_end": t, "dump_start": t, "dump_end": t, "exit": t},
     "loaded": {"version": "v6", "step": 12, "bytes": 912384},
     "saved": {"version": "v7", "step": 17, "bytes": 912384},     # rank 0: the stop save
     "commits": [{"version": "v5", "step": 15, "time": t,          # rank 0: periodic commits, once
                  "seconds": 0.4, "blocked": 0.02, "mode": "background"}],  # the stores hold them
     "commit_count": 1,                                           # (the newest 64 listed; all counted)
     "commit_errors": [{"time": t, "error": "..."}],              # rank 0: failed periodic commits
     "commit_abandoned": 18,                                      # a periodic commit left in flight
     "dump": {"version": "rescue-g3", "step": 16, "bytes": 912384, "state": {...}},
     "dump_error": "...",                                         # a dump that failed
     "exit_code": 75}                                             # ElasticWorker.exit

Times are ``time.time()`` seconds (wall clock: the runner compares them with its own, so
on several machines their clocks must be synchronized, as NTP does). Phases of a
reconfiguration are computed from these marks by :func:`reconfiguration_phases` (pure).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Mapping

__all__ = ["EXIT_DUMPED", "events_dir", "rank_file", "write_json_atomic", "read_generation",
           "RankLog", "reconfiguration_phases", "RUNNER_PHASES"]

#: A worker's exit status after a peer failed and it dumped its shards (EX_TEMPFAIL).
EXIT_DUMPED = 75


def events_dir(run_dir: str | os.PathLike, generation: int) -> Path:
    return Path(run_dir) / "events" / f"g{generation:03d}"


def rank_file(run_dir: str | os.PathLike, generation: int, rank: int) -> Path:
    return events_dir(run_dir, generation) / f"rank-{rank:05d}.json"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see the old or the new file, whole."""
    from ..checkpoint.manifest import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), json.dumps(obj).encode(), sync=False)


def read_generation(run_dir: str | os.PathLike, generation: int) -> dict[int, dict]:
    """Every rank's report of ``generation`` so far: ``{rank: report}``."""
    out = {}
    folder = events_dir(run_dir, generation)
    if not folder.is_dir():
        return out
    for path in folder.glob("rank-*.json"):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # replaced while we read it: the next poll sees it
        out[int(report["rank"])] = report
    return out


class RankLog:
    """One worker's report (see the module docstring); every change is written at once.
    Thread-safe: a worker's abort thread reports while its main thread may be reporting
    too (each change and its write happen under one lock, so the file ends with the last)."""

    def __init__(self, run_dir: str | os.PathLike, generation: int, rank: int, **fields: Any):
        self.path = rank_file(run_dir, generation, rank)
        self.data: dict[str, Any] = {"generation": generation, "rank": rank, "pid": os.getpid(),
                                     "times": {}, "commits": [], **fields}
        self._lock = threading.RLock()
        self.flush()

    def mark(self, name: str, when: float | None = None, **fields: Any) -> None:
        import time

        with self._lock:
            self.data["times"][name] = time.time() if when is None else when
            self.update(**fields)

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            write_json_atomic(self.path, self.data)


def _span(reports: Mapping[int, dict], name: str, pick) -> float | None:
    values = [r["times"][name] for r in reports.values() if name in r.get("times", {})]
    return pick(values) if values else None


#: The phases the runner times itself, in order (the others come from the workers' marks).
RUNNER_PHASES = ("allocate", "announce", "plan", "transform")


def reconfiguration_phases(request: float, old: Mapping[int, dict], exited: float,
                           runner: Mapping[str, tuple[float, float]], new: Mapping[int, dict],
                           first_step_end: float | None,
                           go: float | None = None) -> tuple[dict[str, float], dict[str, float], float]:
    """Phases of one reconfiguration from the marks of the old and new generations. Pure.

    What each phase measures (its two timestamps):

    - ``stop``: the request -> the first old worker starting to save (or, after a
      failure, to dump): the workers finishing their step and agreeing to stop;
    - ``save``: first save (dump) start -> last save (dump) end;
    - ``allocate``, ``announce``, ``plan``, ``transform``: timed by the runner (``runner``,
      see :data:`RUNNER_PHASES` and :mod:`.transitions`): choosing the new allocation and
      starting its agents; waiting for the new workers' announced PTC; planning the
      transformation; the stores moving the bytes and committing the new version;
    - ``relaunch``: last save (dump) end -> every new worker ready (built its model and
      described the job): the old workers exit, the new ones start (unless started ahead),
      join, build; it overlaps the runner's phases;
    - ``load``: the go file (or the workers ready, or the transform's end, whichever is
      last) -> the last worker loaded its shards;
    - ``first_step``: last load end -> the end of the first step in the new layout.

    Args:
        request: when the change was asked for (end of the step it was scheduled after, a
            stop request, or the failure).
        old / new: the rank reports of the stopping and of the new generation.
        exited: when the last old worker had exited (the runner saw its agents end).
        runner: ``{phase: (start, end)}`` for the phases the runner timed.
        first_step_end: when the new layout's first step ended (its metrics row).
        go: when the runner let the new workers load (end of the transform, or later).

    Returns:
        ``(durations, starts, downtime)``: seconds per phase, each phase's start as seconds
        after ``request``, and the downtime (request to the end of the first new step).
    """
    durations: dict[str, float] = {}
    starts: dict[str, float] = {}

    def put(phase: str, a: float | None, b: float | None) -> None:
        if a is not None and b is not None:
            durations[phase] = max(0.0, b - a)
            starts[phase] = max(0.0, a - request)

    save_a = _span(old, "save_start", min) or _span(old, "dump_start", min)
    save_b = _span(old, "save_end", max) or _span(old, "dump_end", max)
    put("stop", request, save_a if save_a is not None else exited)
    put("save", save_a, save_b)
    for phase in RUNNER_PHASES:
        if phase in runner:
            put(phase, *runner[phase])
    ready = _span(new, "ready", max)
    put("relaunch", save_b if save_b is not None else exited, ready)
    load_b = _span(new, "load_end", max)
    transformed = runner["transform"][1] if "transform" in runner else None
    load_a = max([x for x in (go, ready, transformed) if x is not None], default=None)
    put("load", load_a, load_b)
    put("first_step", load_b, first_step_end)
    end = first_step_end or load_b or transformed or request
    return durations, starts, max(0.0, end - request)
