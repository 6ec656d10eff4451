"""Elastic runs: a training job that grows, shrinks, moves and survives failures.

The curated API (imported lazily: workers import :mod:`scalai.elastic.worker` and should not
pay for the runner)::

    from scalai.elastic import Runner, RunSpec, load_schedule
    spec = RunSpec(tuple(load_schedule("sched.json")), steps=40, out="run1", hosts=4, gpus_per_host=2)
    result = Runner(spec).run()          # result.changes: one Reconfiguration per change

See docs/elastic.md.
"""

from __future__ import annotations

import importlib

__all__ = ["Runner", "RunSpec", "RunResult", "Reconfiguration", "ElasticWorker", "Agent", "Trainer",
           "ScriptTrainer", "load_schedule", "parse_schedule", "rank_layouts", "read_timeline", "format_table"]

_WHERE = {"Runner": "runner", "RunResult": "runner", "RunSpec": "spec", "Reconfiguration": "timeline",
          "read_timeline": "timeline", "format_table": "timeline", "ElasticWorker": "worker", "Agent": "agent",
          "Trainer": "trainer", "ScriptTrainer": "trainer", "load_schedule": "schedule",
          "parse_schedule": "schedule", "rank_layouts": "layouts"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
