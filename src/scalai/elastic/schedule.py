"""Allocation-change schedules: what happens to a running job, and when. Pure.

A schedule file is a JSON list of events, each with exactly one trigger and one action::

    [{"step": 10, "devices": 4},                 # grow or shrink to 4 devices
     {"step": 20, "layout": "tp=1,pp=2,dp=2"},   # change to this layout
     {"step": 30, "fail": 1},                    # kill the worker of rank 1
     {"step": 35, "fail": "host1"},              # host1 dies: its workers and its store
     {"time": 45.0, "redeploy": true}]           # move to a disjoint set of hosts

``step`` fires when the job has finished that many steps; ``time`` after that many seconds
of the run. :func:`parse_schedule` validates everything up front and names the event and
the fix when something is wrong.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..bounded import read_json
from ..config import ParallelConfig

__all__ = ["Event", "parse_schedule", "load_schedule", "ACTIONS", "scale_to"]

ACTIONS = ("devices", "layout", "fail", "redeploy")


def scale_to(devices) -> str:
    """``scale to N devices`` (``1 device``)."""
    return f"scale to {devices} device{'' if devices == 1 else 's'}"
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Event:
    """One scheduled change. Exactly one of ``step`` and ``time`` is set."""

    action: str
    value: Any  # devices: int; layout: ParallelConfig; fail: rank (int) or host (str); redeploy: True
    step: int | None = None
    time: float | None = None
    index: int = 0

    @property
    def trigger(self) -> str:
        return f"step {self.step}" if self.step is not None else f"{self.time:g} s"

    def describe(self) -> str:
        what = {"devices": scale_to(self.value), "layout": f"change layout to {self.value}",
                "fail": (f"kill host {self.value}" if isinstance(self.value, str)
                         else f"kill the worker of rank {self.value}"),
                "redeploy": "redeploy to other hosts"}
        return f"{what[self.action]} at {self.trigger}"

    def to_json(self) -> dict:
        trigger = {"step": self.step} if self.step is not None else {"time": self.time}
        value = str(self.value) if self.action == "layout" else self.value
        return {**trigger, self.action: value}


def _bad(i: int, why: str) -> ValueError:
    return ValueError(f"schedule event {i}: {why}")


def _event(i: int, raw: Any) -> Event:
    if not isinstance(raw, dict):
        raise _bad(i, f"must be a JSON object like {{\"step\": 10, \"devices\": 4}}, not {raw!r}")
    unknown = set(raw) - {"step", "time", *ACTIONS}
    if unknown:
        raise _bad(i, f"unknown key(s) {sorted(unknown)}; use step or time, and one of {', '.join(ACTIONS)}")
    triggers = [k for k in ("step", "time") if k in raw]
    if len(triggers) != 1:
        raise _bad(i, "give exactly one of \"step\" and \"time\"")
    actions = [k for k in ACTIONS if k in raw]
    if len(actions) != 1:
        raise _bad(i, f"give exactly one action of {', '.join(ACTIONS)}")
    action, value = actions[0], raw[actions[0]]
    step = time = None
    if triggers[0] == "step":
        step = raw["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise _bad(i, f"step={step!r} must be a non-negative integer")
    else:
        time = raw["time"]
        if isinstance(time, bool) or not isinstance(time, (int, float)) or time < 0:
            raise _bad(i, f"time={time!r} must be a non-negative number of seconds")
        time = float(time)
    if action == "fail" and isinstance(value, str):
        if not _HOST.fullmatch(value):
            raise _bad(i, f"fail={value!r}: give a rank (integer) or a host name like \"host1\"")
    elif action in ("devices", "fail"):
        lo = 1 if action == "devices" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise _bad(i, f"{action}={value!r} must be an integer >= {lo}"
                          + (" (a rank) or a host name" if action == "fail" else ""))
    elif action == "layout":
        try:
            value = ParallelConfig.parse(value) if isinstance(value, str) else None
        except ValueError as exc:
            raise _bad(i, str(exc)) from None
        if value is None:
            raise _bad(i, "layout must be a string like \"tp=1,pp=2,dp=2\"")
    elif value is not True:
        raise _bad(i, "redeploy must be true")
    return Event(action, value, step, time, i)


def parse_schedule(obj: Any) -> list[Event]:
    """Validate a schedule (a list of event objects); events sorted by when they fire."""
    if not isinstance(obj, list):
        raise ValueError("a schedule must be a JSON list of events, e.g. [{\"step\": 10, \"devices\": 4}]")
    events = [_event(i, raw) for i, raw in enumerate(obj)]
    return sorted(events, key=lambda e: (e.step is None, e.step or 0, e.time or 0.0, e.index))


def load_schedule(path: str | os.PathLike) -> list[Event]:
    """Read and validate a schedule file (a regular file of at most 16 MiB of JSON)."""
    try:
        obj = read_json(path, 16 << 20, "schedule file")
    except FileNotFoundError:
        raise FileNotFoundError(f"schedule file {path} does not exist") from None
    return parse_schedule(obj)
