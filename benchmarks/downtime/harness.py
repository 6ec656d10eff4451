"""What the downtime benchmark measures, and the plumbing both sides' drivers share.

A **case** is one change of layout A -> B of the same job: the reference trainer's GPT with
the same data, global batch, micro-batch, learning rate and seed on both sides. A
**scenario** says what triggers the change and when each side may start its new
processes (the same for both sides):

===========  ===================================================  ==========================
scenario     the change                                           the new processes start
===========  ===================================================  ==========================
``ahead``    scheduled after step S (known from the start)        ahead of it, by the same
                                                                  rule on both sides
                                                                  (:func:`ahead_due`)
``cold``     scheduled after step S                               once the old processes
                                                                  have saved
``request``  unscheduled: a request arrives in the middle of      at the request (nothing
             step S, after S-1 steps (:func:`mid_step_time`)      could start earlier)
``request-   the same request                                     once the old processes
cold``                                                            have saved
``kill``     a machine dies: SIGKILL to every process of the      whatever each side does
             last machine in the middle of step S, after S-1      on a failure (only with
             steps (``--machines``)                               simulated machines)
===========  ===================================================  ==========================

Downtime is measured alike on both sides: from the request (a scheduled change: the end of
step S, rank 0's mark after the step's loss all-reduce; a request: when the driver sent
it; a killed machine: the kill) to the end of the first step in the new layout (the same
mark; after a kill, the first step the recovered job runs, which may repeat steps lost). Each side's phases are
measured from its own processes' marks (``time.time()``, all on this machine).

Both sides persist the same way (see each side's ``tricks``): every K steps
(``--commit-every``) a copy that reaches the disk in the background, and at the change a
copy that survives the old processes (scalai: its stores' memory; DCP: files on disk).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Case", "Scenario", "SCENARIOS", "DEFAULT_SCENARIOS", "Settings", "Outcome", "RunFailed", "Processes",
           "poll_until", "read_rows", "step_seconds", "mid_step_time", "ahead_due", "trajectory_difference",
           "env_for_runs"]


@dataclass(frozen=True)
class Case:
    """A change of layout ``old`` -> ``new`` (layout strings, e.g. ``tp=1,pp=1,dp=2``)."""

    old: str
    new: str

    @property
    def label(self) -> str:
        return f"{self.old} -> {self.new}"

    def describe(self) -> str:
        """``grow 2 -> 4 (dp)``, ``4 devices (tp, dp)`` and the like."""
        from scalai.config import ParallelConfig

        a, b = ParallelConfig.parse(self.old), ParallelConfig.parse(self.new)
        axes = ", ".join(d for d in ("tp", "pp", "dp", "zero") if getattr(a, d) != getattr(b, d))
        if a.world_size == b.world_size:
            return f"{a.world_size} devices ({axes})"
        return f"{'grow' if b.world_size > a.world_size else 'shrink'} {a.world_size} -> {b.world_size} ({axes})"


@dataclass(frozen=True)
class Scenario:
    """What triggers the change (``schedule`` or ``request``) and when the new processes
    start (``ahead``, ``at_request`` or ``after_save``)."""

    key: str
    title: str
    trigger: str
    launch: str


SCENARIOS = {s.key: s for s in (
    Scenario("ahead", "scheduled, both start ahead", "schedule", "ahead"),
    Scenario("cold", "scheduled, neither starts ahead", "schedule", "after_save"),
    Scenario("request", "unscheduled request mid-step", "request", "at_request"),
    Scenario("request-cold", "unscheduled request, new processes after the save", "request", "after_save"),
    Scenario("kill", "a machine killed mid-step", "kill", "at_request"),
)}
#: The scenarios a run measures unless told otherwise (the README's columns).
DEFAULT_SCENARIOS = ("ahead", "cold", "request")


@dataclass(frozen=True)
class Settings:
    """What both sides run (see ``reconfigure.py --help``). ``machines`` > 0: on that many
    simulated machines of ``gpus_per_host`` devices each, linked at ``link``
    (:mod:`.cluster`); ``dead_after``: scalai's failure detection (``scalai run
    --dead-after``) and the baseline's process-group timeout, seconds."""

    model: str
    data: str
    at_step: int
    commit_every: int
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    hosts: int = 2
    gpus_per_host: int = 2
    dcp_threads: int = 1
    dcp_change_fsync: bool = False
    scalai_standby: int | None = None
    timeout: float = 1200.0
    machines: int = 0
    link: str = ""
    dead_after: float = 5.0

    def steps(self, scenario: Scenario) -> int:
        """The job's total steps: S+1 for a scheduled change; S+4 for a request or a kill, so
        that a request the job takes a few short steps to act on (delivered through the
        agents, then agreed on at the next step's end) still leaves a step to run in the new
        layout."""
        return self.at_step + (1 if scenario.trigger == "schedule" else 4)

    def trainer_flags(self) -> list[str]:
        """The reference trainer's options both sides pass (``scalai run`` and the baseline)."""
        return ["--model", self.model, "--global-batch", str(self.global_batch), "--micro-batch",
                str(self.micro_batch), "--lr", repr(self.lr), "--seed", str(self.seed), "--data", self.data]


@dataclass
class Outcome:
    """One side's measured run of one case and scenario.

    Attributes:
        downtime: seconds from the request to the end of the first step in the new layout.
        phases / starts: seconds per phase and each phase's start, seconds after the request.
        losses: the loss of every step the run logged, by step.
        stop_step: the last step in the old layout (the first in the new is the next).
        marks: the new processes' progress, seconds after the request (negative: before it).
        counted: bytes, by what was counted (``saved``, ``moved``, ``written``, ...).
        periodic: the periodic saves before the change, ``{"step", "blocked"}`` (seconds the
            training loop waited for each).
        notes: anything else worth a line in the report.
        steps_lost: steps done before the change that the job ran again (a killed machine).
        new_layout: the layout the job continued in (a killed machine: the side chose it).
    """

    downtime: float
    phases: dict[str, float]
    starts: dict[str, float]
    losses: dict[int, float]
    stop_step: int
    marks: dict[str, float] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)
    periodic: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    steps_lost: int = 0
    new_layout: str = ""


class RunFailed(Exception):
    """A launched process failed or a run took too long; the message names its log."""


def env_for_runs(work: Path) -> dict[str, str]:
    """The environment of every launched process: one thread per process, gloo on loopback,
    the runner's registry of control endpoints inside the scratch directory (runs of other
    users on this machine never see this benchmark's jobs)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", GLOO_SOCKET_IFNAME="lo",
                PYTHONUNBUFFERED="1", SCALAI_CACHE=str(work / "cache"))


class Processes:
    """The processes one run started, each with its log; stopped together at the end."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.items: list[tuple[subprocess.Popen, Path, str]] = []

    def start(self, cmd: Sequence[str], log_path: Path, what: str) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self.add(proc, log_path, what)

    def add(self, proc: subprocess.Popen, log_path: Path, what: str) -> subprocess.Popen:
        """Watch ``proc``, started elsewhere (on a simulated machine), writing to ``log_path``."""
        self.items.append((proc, log_path, what))
        return proc

    def forget(self, procs: Sequence[subprocess.Popen]) -> None:
        """Stop watching ``procs`` (killed on purpose: their exit is no failure)."""
        self.items = [item for item in self.items if item[0] not in procs]

    def check(self) -> None:
        """Raise :class:`RunFailed` if one of them exited with an error (its log's tail on stderr)."""
        for proc, log_path, what in self.items:
            rc = proc.poll()
            if rc not in (None, 0):
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                print("\n".join("    " + line for line in tail), file=sys.stderr)
                raise RunFailed(f"{what} exited with status {rc} (output above, from {log_path})")

    def all_done(self) -> bool:
        return all(proc.poll() is not None for proc, _, _ in self.items)

    def stop(self) -> None:
        """SIGTERM to those still running (``scalai run`` and torchrun stop their children),
        SIGKILL after 30 s."""
        running = [proc for proc, _, _ in self.items if proc.poll() is None]
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def poll_until(done: Callable[[], bool], procs: Processes, timeout: float, what: str,
               tick: Callable[[], None] | None = None, interval: float = 0.02) -> None:
    """Call ``tick`` every ``interval`` s until ``done()``; a failed process or ``timeout``
    seconds raise :class:`RunFailed`."""
    deadline = time.time() + timeout
    while True:
        if tick is not None:
            tick()
        if done():
            return
        procs.check()
        if time.time() > deadline:
            raise RunFailed(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


def read_rows(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (a torn last line is left for the next read)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def step_seconds(times: Sequence[float]) -> float | None:
    """The median interval between consecutive step ends (pure); None with fewer than two."""
    if len(times) < 2:
        return None
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def mid_step_time(rows: Sequence[dict], after: int) -> float | None:
    """When to send a request so that it lands in the middle of step ``after + 1`` (pure):
    half the recent step time after step ``after`` ended; None until that step is logged.

    The recent step time is the median over the last steps logged up to ``after`` (at
    least two are needed: ``after >= 2``)."""
    times = [r["time"] for r in rows if r["step"] <= after]
    if not any(r["step"] == after for r in rows):
        return None
    dt = step_seconds(times[-6:])
    return None if dt is None else times[-1] + dt / 2


def ahead_due(rows: Sequence[dict], at_step: int) -> bool:
    """Whether the new processes of a change after ``at_step`` should start now (pure): the
    rule of :func:`scalai.elastic.ahead.lead_steps` with its default start-up estimate
    (no earlier start-up was measured in a run of one change), over the recent step times,
    and not before the first step is done. Both sides start ahead by this rule."""
    from scalai.elastic.ahead import lead_steps

    if not rows:
        return False
    times = [r["time"] for r in rows[-6:]]
    return rows[-1]["step"] >= at_step - lead_steps([], times)


def trajectory_difference(losses: dict[str, dict[int, float]], first_new: dict[str, int]) -> float:
    """Largest relative difference of the losses of the steps every side logged (pure).

    Raises:
        ValueError: a side's first step in the new layout is not among the steps every
            side logged (then nothing would check that the new layout continues alike).
    """
    common = set.intersection(*(set(v) for v in losses.values()))
    for side, step in first_new.items():
        if step not in common:
            raise ValueError(f"{side}'s first step in the new layout ({step}) was not logged by every side "
                             f"(steps logged by all: {sorted(common)})")
    worst = 0.0
    for step in common:
        values = [v[step] for v in losses.values()]
        ref = values[0]
        worst = max(worst, max(abs(x - ref) for x in values) / abs(ref))
    return worst
