"""``scalai demo``: the main job on one machine, with everything embedded.

Four simulated hosts of two devices, a store on each; the bundled corpus (this Python's
standard library) and ``gpt-tiny``. The schedule changes each parallel dimension alone,
grows, shrinks, moves the job to other hosts, picks a layout with the cost model, and kills
a worker whose state survives in a data-parallel replica::

    start  tp=1,pp=1,dp=2   2 devices (the cost model's choice)
    4      tp=2,pp=1,dp=2   tensor parallelism only (grow to 4)
    8      tp=2,pp=1,dp=1   data parallelism only (shrink to 2)
    12     tp=2,pp=2,dp=1   pipeline parallelism only (grow to 4)
    16     redeploy         the same layout on two other hosts
    20     2 devices        the cost model picks the layout (shrink)
    24     kill rank 1      recovered from its replica, continues on 1 device
    28     end

Then the same job runs unchanged (its starting layout, no events) and the two loss curves
are compared (:func:`~.run_cli.compare_runs`, :func:`~.check.check_run`): every sample read exactly once (counted on the
ids the ranks fed their models), and the loss within a relative 1e-4 of the unchanged run
at every step that was not lost.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["DEMO_SCHEDULE", "demo_spec", "new_demo_dir", "run_demo"]

DEMO_SCHEDULE = [
    {"step": 4, "layout": "tp=2,pp=1,dp=2"},
    {"step": 8, "layout": "tp=2,pp=1,dp=1"},
    {"step": 12, "layout": "tp=2,pp=2,dp=1"},
    {"step": 16, "redeploy": True},
    {"step": 20, "devices": 2},
    {"step": 24, "fail": 1},
]
DEMO_STEPS = 28


def demo_spec(out: str | Path, data: str | None = None, job: str = "demo"):
    """The demo's :class:`~scalai.elastic.spec.RunSpec` (writes nothing)."""
    from .schedule import parse_schedule
    from .spec import RunSpec

    return RunSpec(tuple(parse_schedule(DEMO_SCHEDULE)), DEMO_STEPS, str(out), model="gpt-tiny", hosts=4,
                   gpus_per_host=2, devices=2, job=job, commit_every=5, data=data)


def new_demo_dir(base: str | Path = "scalai-demo") -> Path:
    """``base``, or ``base-2``, ``base-3``... : the first that does not exist yet."""
    base = Path(base)
    if not base.exists():
        return base
    n = 2
    while Path(f"{base}-{n}").exists():
        n += 1
    return Path(f"{base}-{n}")


def run_demo(out: Path, data: str | None = None, say=print):
    """Run the demo into ``out``; returns (elastic result, unchanged result, check)."""
    from .run_cli import compare_runs
    from .runner import Runner
    from .timeline import format_table

    spec = demo_spec(out, data)
    say(f"scalai demo: gpt-tiny on 4 simulated hosts x 2 devices, {DEMO_STEPS} steps; schedule:")
    for e in spec.schedule:
        say(f"  {e.describe()}")
    say("")
    result = Runner(spec, report=False).run()
    (out / "schedule.json").write_text(json.dumps(DEMO_SCHEDULE, indent=1))
    reference, check = compare_runs(spec, result, say)
    say("\ntimeline (seconds per phase; bytes moved by the transformation):\n")
    say(format_table(result.changes))
    say("")
    for line in check.lines():
        say(line)
    say(f"\nplots: {out / 'loss.png'} (loss vs the unchanged run, changes marked)\n"
        f"       {out / 'timeline.png'} (phases of every reconfiguration)\n"
        f"data:  {out / 'metrics.jsonl'}, {out / 'timeline.json'}")
    return result, reference, check
