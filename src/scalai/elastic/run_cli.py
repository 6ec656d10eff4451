"""``scalai run`` behind the CLI: build the spec, run, optionally an unchanged run to compare."""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_from_cli", "compare_runs", "load_events", "stop_on_sigterm"]


def load_events(schedule_file: str | None):
    from .schedule import load_schedule

    return tuple(load_schedule(schedule_file)) if schedule_file else ()


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit``, so that the runner stops its agents and stores on the
    way out (``finally``) as it does on Ctrl-C."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def run_from_cli(*, schedule_file, steps, out, compare=False, control_token_file=None, **kw):
    """Validate everything, run, and (``compare``) run the unchanged job beside it."""
    from ..store.client import load_token
    from .runner import Runner
    from .spec import RunSpec

    token = load_token(control_token_file, env=False) if control_token_file else None
    spec = RunSpec(load_events(schedule_file), steps, str(out), control_token=token, **kw)
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"run directory {out} is not empty; choose a new --out")
    stop_on_sigterm()
    result = Runner(spec).run()
    if compare:
        compare_runs(spec, result)
    return result


def compare_runs(spec, result, say=print):
    """Run ``spec``'s job unchanged (its starting layout, no events) in ``OUT/unchanged`` and
    plot the elastic run against it; returns the largest relative loss difference over the
    steps that were not lost."""
    from dataclasses import replace

    from .progress import effective_rows
    from .runner import Runner
    from .timeline import plot_loss

    out = Path(result.out)
    start = spec.initial()
    base = replace(spec, schedule=(), out=str(out / "unchanged"), layout=str(start.layout), devices=None,
                   job=f"{spec.job}-unchanged", persist=False, commit_every=0)
    say(f"\nthe same job unchanged ({start.layout}, no events), for comparison ...")
    import io

    ref = Runner(base, out=io.StringIO(), report=False).run()
    rows = effective_rows(result.rows)
    ref_loss = {r["step"]: r["loss"] for r in effective_rows(ref.rows)}
    diffs = {r["step"]: abs(r["loss"] - ref_loss[r["step"]]) / abs(ref_loss[r["step"]])
             for r in rows if r["step"] in ref_loss}
    plot_loss({"elastic run": result.rows, f"unchanged ({start.layout})": ref.rows}, out / "loss.png",
              result.changes, f"{spec.job}: loss of the elastic run against the unchanged run",
              reference=f"unchanged ({start.layout})")
    worst = max(diffs.values(), default=0.0)
    at = max(diffs, key=diffs.get) if diffs else None
    say(f"\nloss against the unchanged run: largest relative difference {worst:.1e}"
        + (f" (step {at})" if at else "") + f" over {len(diffs)} steps; plot in {out / 'loss.png'}")
    return worst
