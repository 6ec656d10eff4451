"""``scalai run`` behind the CLI: build the spec, run, optionally an unchanged run to compare."""

from __future__ import annotations

from pathlib import Path

from ..errors import ScalaiError

__all__ = ["run_from_cli", "compare_runs", "load_events", "stop_on_sigterm", "RunCheckFailed"]


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


class RunCheckFailed(ScalaiError):
    """``scalai run --compare``: the elastic run did not follow the unchanged run."""


def run_from_cli(*, schedule_file, steps, out, compare=False, token_file=None, **kw):
    """Validate everything, run, and (``compare``) run the unchanged job beside it and check
    the elastic run against it (:func:`~.check.check_run`; raises :class:`RunCheckFailed`)."""
    from ..store.client import load_token
    from .runner import Runner
    from .spec import RunSpec

    token = load_token(token_file)
    spec = RunSpec(load_events(schedule_file), steps, str(out), token=token, **kw)
    if compare and spec.agents is not None:
        raise ValueError("--compare runs the job unchanged on this machine: use it without --agents")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"run directory {out} is not empty; choose a new --out")
    stop_on_sigterm()
    result = Runner(spec).run()
    if compare:
        _, check = compare_runs(spec, result)
        print()
        for line in check.lines():
            print(line)
        print(f"plot: {Path(result.out) / 'loss.png'}")
        if not check.ok:
            raise RunCheckFailed("the elastic run did not follow the unchanged run (FAIL above); its "
                                 f"metrics are in {Path(result.out) / 'metrics.jsonl'}")
    return result


def compare_runs(spec, result, say=print):
    """Run ``spec``'s job unchanged (its starting layout, no events) in ``OUT/unchanged``,
    plot the elastic run against it (``OUT/loss.png``) and check it
    (:func:`~.check.check_run`). Returns ``(the unchanged run's result, the check)``."""
    import io
    from dataclasses import replace

    from .check import check_run
    from .runner import Runner
    from .timeline import plot_loss

    out = Path(result.out)
    start = spec.initial()
    base = replace(spec, schedule=(), out=str(out / "unchanged"), layout=str(start.layout), devices=None,
                   job=f"{spec.job}-unchanged", persist=False, commit_every=0, hosts=len(start.hosts))
    say(f"\nthe same job unchanged ({start.layout}, no events), for comparison ...")
    reference = Runner(base, out=io.StringIO(), report=False).run()
    name = f"unchanged run ({start.layout})"
    plot_loss({"elastic run": result.rows, name: reference.rows}, out / "loss.png", result.changes,
              f"{spec.job}: loss of the elastic run against the unchanged run", reference=name)
    return reference, check_run(result.rows, reference.rows, spec.steps)
