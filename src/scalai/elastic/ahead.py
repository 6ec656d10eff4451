"""Starting the next generation ahead of a change, so that process start-up overlaps training.

Starting a generation costs seconds before its first step: Python and torch load in every
agent and worker, the agents meet in their rendezvous, the workers join their process
group. None of that needs the devices, so the runner starts the next generation early:

- for a scheduled change, :func:`lead_steps` steps before it (the measured start-up time
  over the current step time);
- for a requested change (``scalai scale``, a time event), at once.

With ``RunSpec.start_ahead`` off (``scalai run --no-start-ahead``) it does neither: the next
generation starts once the old workers have saved.

Its workers then wait for the devices (:meth:`ElasticWorker.wait_devices`), which the runner
frees once the old workers have exited. If something else happens first (a failure, another
request), the early generation is killed (:func:`drop_successor`) and a new one started.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .events import read_generation

if TYPE_CHECKING:
    from .runner import Generation, Runner

__all__ = ["lead_steps", "maybe_prelaunch", "drop_successor", "startup_seconds"]

DEFAULT_STARTUP_S = 10.0


def lead_steps(startups: Sequence[float], row_times: Sequence[float]) -> int:
    """Steps before a change to start the next generation (pure): the median measured
    start-up (default 10 s) over the recent step time (default 0.5 s), plus one."""
    ordered = sorted(startups)
    startup = ordered[len(ordered) // 2] if ordered else DEFAULT_STARTUP_S
    step = (row_times[-1] - row_times[0]) / (len(row_times) - 1) if len(row_times) > 2 else 0.5
    return int(startup / max(step, 1e-3)) + 1


def startup_seconds(runner: Runner) -> list[float]:
    """Measured start-ups of finished generations: launch to the workers waiting for devices."""
    cache = runner.__dict__.setdefault("_startups", {})
    for g in runner._gens:
        if g.number not in cache and g is not runner.gen and g.first_row is not None:
            marks = [r["times"].get("waiting") for r in read_generation(runner.dir, g.number).values()]
            cache[g.number] = max(marks) - g.launched if marks and all(marks) else None
    return [v for v in cache.values() if v is not None]


def maybe_prelaunch(runner: Runner, gen: Generation, stopping: bool) -> None:
    """Start ``gen``'s successor if a change is near (see the module docstring)."""
    if not runner.spec.start_ahead or gen.successor is not None or gen.killed or gen.first_row is None:
        return  # (not before its first step: two generations starting at once help neither)
    step = runner.rows[-1]["step"]
    with runner._lock:
        asked = [(a, v) for a, v, _, _ in runner._requests]
    if stopping and asked:
        actions, start = asked, step
    elif not asked and gen.until < runner.spec.steps:
        times = [r["time"] for r in runner.rows[-6:] if r.get("time")]
        if step < gen.until - lead_steps(startup_seconds(runner), times):
            return
        actions, start = [(e.action, e.value) for e in runner.due(gen.until)], gen.until
    else:
        return
    alloc = runner.allocation_after(gen.alloc, actions)
    if alloc is not None and alloc != gen.alloc:
        gen.successor = runner.launch(alloc, start, resume=True, free=False, activate=False)


def drop_successor(gen: Generation) -> None:
    """Kill the generation started ahead of ``gen``'s end (it waits for devices it will not get)."""
    if gen.successor is not None:
        for a in gen.successor.agents:
            a.kill()
        gen.successor = None
