"""The end of a run: its outputs written and the timeline printed.

``metrics.jsonl`` is rewritten once, atomically, with the steps that ran again marked
``lost``; then ``timeline.json``, ``timeline.png``, ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from ..checkpoint.manifest import atomic_write
from .events import write_json_atomic
from .progress import mark_lost
from .timeline import format_table, plot_loss, plot_timeline, write_timeline

if TYPE_CHECKING:
    from .runner import RunResult, Runner

__all__ = ["finish"]


def finish(runner: Runner, outcome) -> RunResult:
    """Write the run's outputs (see the module docstring) and return its result."""
    from .runner import RunResult

    runner.state = "done"
    for _, _, reason, _ in runner.take_requests():
        runner.say(f"{reason}: not carried out, the job reached its last step first")
    runner.record_commit(outcome.version, outcome.step, runner.alloc.hosts)
    if runner.persister is not None:
        runner.persister.wait_idle(120)
    latest = runner.persister.latest() if runner.persister else None
    rows = mark_lost(runner.rows)
    runner.metrics_out.close()
    atomic_write(str(runner.dir / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode(), sync=False)
    write_timeline(runner.dir / "timeline.json", runner.changes)
    plot_timeline(runner.changes, runner.dir / "timeline.png", f"{runner.spec.job}: reconfigurations")
    plot_loss({"elastic run": rows}, runner.dir / "loss.png", runner.changes,
              f"{runner.spec.job}: training loss")
    lost = sum(c.steps_lost for c in runner.changes)
    summary = {"job": runner.spec.job, "steps": outcome.step, "final_layout": str(runner.alloc.layout),
               "final_version": outcome.version, "checkpoint": str(latest.path) if latest else None,
               "reconfigurations": len(runner.changes), "downtime_s": sum(c.downtime for c in runner.changes),
               "steps_lost": lost, "wall_s": time.time() - runner._t0}
    write_json_atomic(runner.dir / "summary.json", summary)
    runner.say(f"\nstep {outcome.step}/{runner.spec.steps} reached in {summary['wall_s']:.0f} s; "
               f"{len(runner.changes)} reconfigurations, {summary['downtime_s']:.1f} s down, {lost} steps lost")
    if runner.report:
        runner.say("\n" + format_table(runner.changes))
    runner.say(f"\nwrote {runner.dir}/metrics.jsonl, timeline.json, timeline.png, loss.png"
               + (f"; final state persisted in {latest.path}" if latest else ""))
    return RunResult(runner.dir, rows, runner.changes, outcome.step, outcome.version,
                     str(latest.path) if latest else None)
