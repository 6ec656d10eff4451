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
are compared: every sample read exactly once, and the loss within a relative 1e-4 of the
unchanged run at every step that was not lost.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_SCHEDULE", "demo_spec", "check_run", "RunCheck", "new_demo_dir"]

DEMO_SCHEDULE = [
    {"step": 4, "layout": "tp=2,pp=1,dp=2"},
    {"step": 8, "layout": "tp=2,pp=1,dp=1"},
    {"step": 12, "layout": "tp=2,pp=2,dp=1"},
    {"step": 16, "redeploy": True},
    {"step": 20, "devices": 2},
    {"step": 24, "fail": 1},
]
DEMO_STEPS = 28
TOLERANCE = 1e-4  # the training issue's: relative loss difference to the unchanged run


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


@dataclass(frozen=True)
class RunCheck:
    """What :func:`check_run` found."""

    steps: int
    samples: int
    repeated: int
    missing_steps: list[int]
    max_difference: float
    at_step: int | None
    compared: int

    @property
    def ok(self) -> bool:
        return not self.repeated and not self.missing_steps and self.max_difference <= TOLERANCE

    def lines(self) -> list[str]:
        mark = {True: "ok  ", False: "FAIL"}
        return [f"{mark[not self.repeated and not self.missing_steps]} data: {self.samples} samples over "
                f"{self.steps} steps, each read exactly once"
                + ("" if not self.repeated else f" - {self.repeated} read more than once")
                + ("" if not self.missing_steps else f" - steps missing: {self.missing_steps}"),
                f"{mark[self.max_difference <= TOLERANCE]} loss: largest relative difference to the unchanged "
                f"run {self.max_difference:.1e}" + (f" (step {self.at_step})" if self.at_step else "")
                + f" over {self.compared} steps; tolerance {TOLERANCE:g}"]


def check_run(rows: list[dict], reference: list[dict], steps: int) -> RunCheck:
    """Exactly-once data and loss agreement of an elastic run with an unchanged one (pure)."""
    from .progress import effective_rows, sample_counts

    kept = effective_rows(rows)
    counts = sample_counts(rows)
    ref = {r["step"]: r for r in effective_rows(reference)}
    missing = sorted(set(range(1, steps + 1)) - {r["step"] for r in kept})
    same_data = [r["step"] for r in kept if r["step"] in ref and r["samples"] != ref[r["step"]]["samples"]]
    diffs = {r["step"]: abs(r["loss"] - ref[r["step"]]["loss"]) / abs(ref[r["step"]]["loss"])
             for r in kept if r["step"] in ref}
    worst = max(diffs, key=diffs.get) if diffs else None
    return RunCheck(len(kept), len(counts), sum(1 for c in counts.values() if c > 1) + len(same_data), missing,
                    diffs.get(worst, 0.0) if worst else 0.0, worst, len(diffs))


def run_demo(out: Path, data: str | None = None, say=print):
    """Run the demo into ``out``; returns (elastic result, unchanged result, check)."""
    from .runner import Runner
    from .timeline import format_table, plot_loss

    spec = demo_spec(out, data)
    say(f"scalai demo: gpt-tiny on 4 simulated hosts x 2 devices, {DEMO_STEPS} steps; schedule:")
    for e in spec.schedule:
        say(f"  {e.describe()}")
    say("")
    result = Runner(spec, report=False).run()
    (out / "schedule.json").write_text(json.dumps(DEMO_SCHEDULE, indent=1))
    say("\nthe same job unchanged (tp=1,pp=1,dp=2, no events), for comparison ...")
    from dataclasses import replace

    start = spec.initial()
    base = replace(spec, schedule=(), out=str(out / "unchanged"), layout=str(start.layout), devices=None,
                   job=f"{spec.job}-unchanged", persist=False, commit_every=0)
    reference = Runner(base, out=io.StringIO()).run()
    ref_name = f"unchanged run ({start.layout})"
    plot_loss({"elastic run": result.rows, ref_name: reference.rows}, out / "loss.png", result.changes,
              "scalai demo: loss of the elastic run against the unchanged run", reference=ref_name)
    check = check_run(result.rows, reference.rows, DEMO_STEPS)
    say("\ntimeline (seconds per phase; bytes moved by the transformation):\n")
    say(format_table(result.changes))
    say("")
    for line in check.lines():
        say(line)
    say(f"\nplots: {out / 'loss.png'} (loss vs the unchanged run, changes marked)\n"
        f"       {out / 'timeline.png'} (phases of every reconfiguration)\n"
        f"data:  {out / 'metrics.jsonl'}, {out / 'timeline.json'}")
    return result, reference, check
