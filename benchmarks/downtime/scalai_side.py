"""scalai's side of the downtime benchmark: ``scalai run``, as a user runs it.

- a scheduled change: ``scalai run --layout A --schedule '[{"step": S, "layout": "B"}]'
  --steps S+1 --commit-every K`` (``--no-start-ahead`` for the ``cold`` scenario);
- a request: ``scalai run --layout A --steps S+2 --commit-every K``, and in the middle of
  step S the driver posts ``{"layout": "B"}`` to the run's control endpoint (what
  ``scalai scale JOB --layout B`` sends).

Both on ``--hosts 2 --gpus-per-host 2`` (a store per simulated host, in memory), or, with
simulated machines (``Settings.machines``, :func:`on_machines`), as on a cluster: the
coordinator ``scalai run --listen ADDR:PORT --agents N --token-file F`` in the root
namespace, one ``scalai agent --join`` per machine (its store on the machine's tmpfs), the
request sent over the network, and for a killed machine SIGKILL to every process of the
last machine in the middle of step S (the coordinator notices from the missing heartbeats,
``--dead-after``, and recovers). The figures are the run's own, as the coordinator
received them over the network: the phases from ``timeline.json``, the losses and step ends
from ``metrics.jsonl``, when the new workers started from their reports
(``events/g001``), the periodic commits from rank 0's report (``events/g000``).
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import time
from pathlib import Path

from .harness import (Case, Outcome, Processes, RunFailed, Scenario, Settings, env_for_runs, mid_step_time,
                      poll_until, read_rows)

__all__ = ["NAME", "phases", "run", "scheduled", "requested", "tricks"]

NAME = "scalai"


def phases() -> tuple[str, ...]:
    """The timeline's phases, in its own order."""
    from scalai.elastic.timeline import PHASES

    return ("detect", *PHASES)  # detect: a killed machine, from the kill to the runner's first sign of it


def run(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """One measured run of ``case`` under ``scenario`` in the scratch directory ``work``."""
    if settings.machines:
        return on_machines(settings, case, scenario, work)
    return {"schedule": scheduled, "request": requested}[scenario.trigger](settings, case, scenario, work)


def _command(settings: Settings, case: Case, scenario: Scenario, out: Path, *extra: str,
             where: tuple[str, ...] = ()) -> list[str]:
    """``scalai run``; ``where``: its agents (default: ``--hosts``/``--gpus-per-host`` local ones)."""
    ahead = [] if scenario.launch in ("ahead", "at_request") else ["--no-start-ahead"]
    if settings.scalai_standby is not None and not where:
        ahead += ["--standby", str(settings.scalai_standby)]
    where = where or ("--hosts", str(settings.hosts), "--gpus-per-host", str(settings.gpus_per_host))
    return [sys.executable, "-c", "import sys; from scalai.cli.main import main; sys.exit(main())", "run",
            "--layout", case.old, "--steps", str(settings.steps(scenario)), *where, "--commit-every",
            str(settings.commit_every), *ahead, "--out", str(out), *settings.trainer_flags(), *extra]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def on_machines(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """``case`` under ``scenario`` on ``settings.machines`` simulated machines: the
    coordinator here, an agent per machine; a request over the network, or every process of
    the last machine killed, in the middle of step S (a schedule: as on one machine)."""
    from scalai.elastic.control import send_scale

    from .cluster import Cluster

    out, token = work / "run", secrets.token_urlsafe(24)
    (work / "token").write_text(token)
    extra: list[str] = []
    if scenario.trigger == "schedule":
        (work / "schedule.json").write_text(json.dumps([{"step": settings.at_step, "layout": case.new}]))
        extra = ["--schedule", str(work / "schedule.json")]
    sent: list[float] = []
    env = env_for_runs(work)
    with Cluster(work, settings.machines, settings.link) as cluster:
        listen = f"{cluster.address}:{_free_port(cluster.address)}"
        where = ("--listen", listen, "--agents", str(settings.machines), "--token-file", str(work / "token"),
                 "--dead-after", f"{settings.dead_after:g}", "--job", f"reconfigure-{secrets.token_hex(4)}")
        agent_env = {k: v for k, v in env.items() if k != "GLOO_SOCKET_IFNAME"}  # the agent finds its own
        standby = ("--standby", str(settings.scalai_standby)) if settings.scalai_standby is not None else ()

        def tick() -> None:
            if sent or scenario.trigger == "schedule":
                return
            at = mid_step_time(read_rows(out / "metrics.jsonl"), settings.at_step - 1)
            if at is None or time.time() < at:
                return
            sent.append(time.time())
            if scenario.trigger == "kill":
                cluster.kill(settings.machines - 1)
                return
            try:
                send_scale(json.loads((out / "control.json").read_text())["url"], {"layout": case.new}, token)
            except (ValueError, ConnectionError) as exc:
                raise RunFailed(f"the request to scalai run failed: {exc} (see {work / 'scalai.log'})") from None

        procs = Processes(env)
        try:
            procs.start(_command(settings, case, scenario, out, *extra, where=where), work / "scalai.log",
                        "scalai run")
            for i in range(settings.machines):
                cluster.net.start(i, listen, token, devices=settings.gpus_per_host, log=work / f"agent-{i}.log",
                                  extra=standby, env={**agent_env, "SCALAI_CACHE": str(cluster.private(i) / "cache")})
            poll_until(procs.all_done, procs, settings.timeout, "scalai run", tick)
            procs.check()
        finally:
            procs.stop()
    if scenario.trigger != "schedule" and not sent:
        raise RunFailed(f"scalai run ended before the {scenario.trigger} (see {work / 'scalai.log'})")
    return _outcome(out, sent[0] if sent else None, killed=scenario.trigger == "kill")


def scheduled(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """A change after step S, from the schedule."""
    out, schedule = work / "run", work / "schedule.json"
    schedule.write_text(json.dumps([{"step": settings.at_step, "layout": case.new}]))
    procs = Processes(env_for_runs(work))
    try:
        procs.start(_command(settings, case, scenario, out, "--schedule", str(schedule)), work / "scalai.log",
                    "scalai run")
        poll_until(procs.all_done, procs, settings.timeout, "scalai run", interval=0.1)
        procs.check()
    finally:
        procs.stop()
    return _outcome(out, None)


def requested(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """A ``scalai scale`` request in the middle of step S."""
    from scalai.elastic.control import send_scale

    out = work / "run"
    procs = Processes(env_for_runs(work))
    sent: list[float] = []

    def tick() -> None:
        if sent:
            return
        at = mid_step_time(read_rows(out / "metrics.jsonl"), settings.at_step - 1)
        if at is not None and time.time() >= at:
            url = json.loads((out / "control.json").read_text())["url"]
            sent.append(time.time())
            try:
                send_scale(url, {"layout": case.new})
            except (ValueError, ConnectionError) as exc:
                raise RunFailed(f"the request to scalai run failed: {exc} (see {work / 'scalai.log'})") from None

    try:
        procs.start(_command(settings, case, scenario, out), work / "scalai.log", "scalai run")
        poll_until(procs.all_done, procs, settings.timeout, "scalai run", tick)
        procs.check()
    finally:
        procs.stop()
    if not sent:
        raise RunFailed(f"scalai run ended before the request was sent (see {work / 'scalai.log'})")
    return _outcome(out, sent[0])


def _outcome(out: Path, sent: float | None, killed: bool = False) -> Outcome:
    """The measured change of the run in ``out``; ``sent``: when a request was sent (or,
    ``killed``, when the machine was killed)."""
    changes = json.loads((out / "timeline.json").read_text())
    if len(changes) != 1:
        raise RunFailed(f"scalai run recorded {len(changes)} reconfigurations, expected 1 ({out})")
    change = changes[0]
    rows = [r for r in read_rows(out / "metrics.jsonl") if not r.get("lost")]
    stop = change["at_step"]
    end_of = {r["step"]: r["time"] for r in rows}
    phases, starts, notes = dict(change["phases"]), dict(change["starts"]), []
    if sent is None:
        request, downtime = end_of[stop], change["downtime"]
    else:
        # The runner times from when it received the request (a failure: its first sign);
        # the downtime counts from when it was sent (the delivery, milliseconds, is added
        # to "stop") or from the kill (the detection is a phase of its own).
        request, downtime = sent, end_of[stop + 1] - sent
        delivery = downtime - change["downtime"]
        starts = {k: v + delivery for k, v in starts.items()}
        if killed:
            phases, starts["detect"] = {"detect": delivery, **phases}, 0.0
            notes.append(f"{change['reason']}: recovered from {change.get('recovered_from') or '?'} "
                         f"({change.get('to_layout')}), {change.get('steps_lost', 0)} steps lost")
            if "allocate" in starts:  # the new layout is chosen once the machine is declared dead
                notes.append(f"the runner chose the survivors' layout {starts['allocate']:.2f} s after the kill "
                             "(once it declared the machine dead: its store refused connections after a "
                             "heartbeat and a half of silence, else after --dead-after seconds)")
        else:
            phases["stop"], starts["stop"] = phases.get("stop", 0.0) + delivery, 0.0
            notes.append(f"request delivered in {1000 * delivery:.0f} ms")
    counted = {"saved": change.get("saved_bytes", 0), "moved": change.get("bytes_moved", 0),
               "linked": change.get("bytes_linked", 0),
               "cross_host": change.get("cross_host_bytes", 0), "persisted": _persisted_bytes(out)}
    return Outcome(downtime, phases, starts, {r["step"]: r["loss"] for r in rows}, stop,
                   _new_worker_marks(out, request), counted, _commits(out), notes,
                   steps_lost=change.get("steps_lost", 0), new_layout=change.get("to_layout", ""))


def _new_worker_marks(out: Path, request: float) -> dict[str, float]:
    """When the new generation's workers started, joined, announced the new layout's PTC (if
    the run did not know it), waited for the devices, got them and were ready (the slowest
    rank), seconds after ``request``; empty without reports."""
    names = {"process_start": "start", "joined": "joined", "announced": "announced", "waiting": "waiting",
             "devices": "devices", "ready": "built"}
    marks: dict[str, float] = {}
    for path in sorted((out / "events" / "g001").glob("rank-*.json")):
        times = json.loads(path.read_text()).get("times", {})
        for key, name in names.items():
            if key in times:
                marks[name] = max(marks.get(name, float("-inf")), times[key] - request)
    return marks


def _commits(out: Path) -> list[dict]:
    """The periodic commits of the first generation: step, and seconds the training loop
    spent in it (``blocked``: the staging copy and the polls of a commit in the background,
    the whole write of a blocking one)."""
    path = out / "events" / "g000" / "rank-00000.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    return [{"step": c["step"], "blocked": c.get("blocked", c.get("seconds"))} for c in report.get("commits", [])]


def _persisted_bytes(out: Path) -> int:
    """Bytes of one persistent copy on disk (the newest: the runner keeps two), 0 if none."""
    copies = sorted((out / "checkpoints").glob("step-*"))
    return sum(f.stat().st_size for f in copies[-1].rglob("*") if f.is_file()) if copies else 0


def tricks(settings: Settings, scenario: Scenario) -> list[str]:
    """What this side does, for the report."""
    k = settings.commit_every
    if settings.machines:
        return _machine_tricks(settings, scenario)
    start = {"ahead": "a few steps before the change (the runner's rule: its start-up estimate over the step "
                      "time), up to waiting for the devices (torch imported, rendezvous, job described on the meta "
                      "device)",
             "at_request": "at the request, while the old workers finish their step and save",
             "after_save": "once the old workers have saved (--no-start-ahead)"}[scenario.launch]
    standby = ("each agent keeps one started worker per free device (Python, torch and the trainer imported, "
               "waiting for an assignment): a launch takes one instead of starting a process"
               if settings.scalai_standby is None else
               f"standby workers per agent: {settings.scalai_standby} (scalai run --standby)")
    return [
        f"new processes: each simulated host's scalai agent starts its ranks' workers (torchrun's environment, "
        f"c10d rendezvous on the coordinator) {start}; they build the model once the old workers have exited",
        standby,
        (f"persisted: every {k} steps a commit in the background (scalai run's default, --commit-mode "
         "background): every rank copies its shards into host memory (the step waits for that copy only), a "
         "thread uploads them over loopback into its host's store (memory), rank 0 commits once every upload "
         "ended (checked after each step); each commit is copied to disk (OUT/checkpoints, fsynced, atomic) by a "
         "background thread of the runner" if k else "persisted: nothing before the change (--commit-every 0)")
        + "; at the change: a commit still in flight is finished first, then every rank saves its shards into "
          "its host's store (memory, /dev/shm; a replica once per host), copied to disk only after the first "
          "step in the new layout",
        "pre-allocated: the stores' files are memory-backed; the new workers allocate the model and Adam "
        "state (zeros) when they build, before the load, which maps the stores' files and checks CRC-32s",
        "bytes counted: saved = what the old workers wrote into the stores, moved = what the transform wrote "
        "into the new layout (of which cross-host), persisted = one periodic copy on disk",
    ]


def _machine_tricks(settings: Settings, scenario: Scenario) -> list[str]:
    """What this side does on simulated machines."""
    k = settings.commit_every
    lines = [
        f"the coordinator (scalai run --listen ADDR:PORT --agents {settings.machines} --token-file F --dead-after "
        f"{settings.dead_after:g}) in the root namespace; one scalai agent --join per machine, in its namespace, "
        "its store in the machine's tmpfs; metrics, reports and the timeline reach the coordinator's run "
        "directory over the network",
        "each agent keeps one started worker per free device (standby: Python, torch and the trainer imported)"
        if settings.scalai_standby is None else f"standby workers per agent: {settings.scalai_standby}",
        (f"persisted: every {k} steps a commit in the background into the machines' stores (memory), copied to "
         "disk in the coordinator's run directory by a background thread of the runner" if k else
         "persisted: nothing before the change"),
    ]
    if scenario.trigger == "kill":
        lines.append("after the kill: the survivors' collectives fail (or the coordinator, missing the machine's "
                     f"heartbeats for {settings.dead_after:g} s, takes them out); the survivors dump their shards "
                     "into their stores, the runner declares the machine dead, plans the survivors' layout from "
                     "replicas (else the last committed version), transforms in the stores, standby workers load "
                     "and train on")
    else:
        lines.append("at the change: every rank saves its shards into its machine's store, the stores transform "
                     "them (bytes between machines over their links), the new workers (started at the request or "
                     "ahead) load them")
    lines.append("bytes counted: saved = what the old workers wrote into the stores, moved = what the transform "
                 "wrote into the new layout (of which cross_host), persisted = one periodic copy on disk")
    return lines
