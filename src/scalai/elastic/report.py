"""The end of a run: its outputs written and the timeline printed (:func:`write_outputs`).

``metrics.jsonl`` is rewritten once, atomically, with the steps that ran again marked
``lost``; then ``timeline.json``, ``timeline.png``, ``loss.png`` and ``summary.json``.
"""

from __future__ import annotations

import json

from ..checkpoint.manifest import atomic_write
from .events import write_json_atomic
from .progress import mark_lost
from .timeline import format_table, plot_loss, plot_timeline, write_timeline

__all__ = ["write_outputs"]


def write_outputs(out, job: str, rows, changes, step: int, version, checkpoint, wall_s: float, alloc, say,
                  table: bool = True) -> list[dict]:
    """``metrics.jsonl`` (rewritten with the lost steps marked), ``timeline.json``, the
    plots and ``summary.json`` in ``out``; the summary lines through ``say``. Returns the rows."""
    from pathlib import Path

    out = Path(out)
    rows = mark_lost(rows)
    atomic_write(str(out / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode(), sync=False)
    write_timeline(out / "timeline.json", changes)
    plot_timeline(changes, out / "timeline.png", f"{job}: reconfigurations")
    plot_loss({"elastic run": rows}, out / "loss.png", changes, f"{job}: training loss")
    lost = sum(c.steps_lost for c in changes)
    summary = {"job": job, "steps": step, "final_layout": str(alloc.layout), "final_version": version,
               "checkpoint": checkpoint, "reconfigurations": len(changes),
               "downtime_s": sum(c.downtime for c in changes), "steps_lost": lost, "wall_s": wall_s}
    write_json_atomic(out / "summary.json", summary)
    say(f"\nstep {step} reached in {wall_s:.0f} s; {len(changes)} reconfigurations, "
        f"{summary['downtime_s']:.1f} s down, {lost} steps lost")
    if table:
        say("\n" + format_table(changes))
    say(f"\nwrote {out}/metrics.jsonl, timeline.json, timeline.png, loss.png"
        + (f"; final state persisted in {checkpoint}" if checkpoint else ""))
    return rows
