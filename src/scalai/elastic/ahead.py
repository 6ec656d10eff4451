"""How far ahead of a scheduled change to start the next generation. Pure.

Starting a generation costs seconds before its first step (its workers take their
standbys' places, join their process group, describe the job, build the model). None of
that needs the devices, so the controller starts the next generation early
(:func:`scalai.elastic.changes.prelaunch`): for a scheduled change :func:`lead_steps` steps
before it (the measured start-up time over the current step time); for a requested change
(``scalai scale``, a time event, a machine joining or leaving) at once. Its workers then
wait for the devices (:meth:`ElasticWorker.wait_devices`), freed once the old workers
have exited. With ``start_ahead`` off (``scalai run --no-start-ahead``) it does neither:
the next generation starts once the old workers have saved.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["lead_steps", "DEFAULT_STARTUP_S"]

DEFAULT_STARTUP_S = 10.0


def lead_steps(startups: Sequence[float], row_times: Sequence[float]) -> int:
    """Steps before a change to start the next generation (pure): the median measured
    start-up (default 10 s) over the recent step time (default 0.5 s), plus one."""
    ordered = sorted(startups)
    startup = ordered[len(ordered) // 2] if ordered else DEFAULT_STARTUP_S
    step = (row_times[-1] - row_times[0]) / (len(row_times) - 1) if len(row_times) > 2 else 0.5
    return int(startup / max(step, 1e-3)) + 1
