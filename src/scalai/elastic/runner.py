"""The elastic runner: a training job that grows, shrinks, moves and survives failures.

``Runner(spec).run()`` (CLI: ``scalai run``) keeps one job going over a changing set of
devices. Per *generation* (one layout on one set of hosts) it starts one torchrun agent per
host (:mod:`.launch`), watches the workers' metrics and reports (:mod:`.events`), and acts:

- a step-triggered event: the workers were launched to stop after that step; they save to
  their own hosts' stores (a memory copy) and exit;
- a time-triggered event or ``scalai scale`` (the control endpoint, :mod:`.control`): the
  runner touches the generation's stop file; every worker stops after the same step;
- ``fail``: the runner kills that rank's process (or a whole host: its agent, workers and
  store); the survivors' collectives fail, they dump their shards, and the runner recovers
  (:mod:`.recovery`).

Then it chooses the new allocation (:mod:`.allocation`: the cost model for a device count),
starts the new agents at once (their start-up overlaps the transformation), transforms the
state inside the stores (:func:`scalai.store.reshard`, distributed: every new host pulls
its slices), and lets the new workers load. Every change is timed phase by phase into a
:class:`~scalai.elastic.timeline.Reconfiguration`.

Outputs in the run directory: ``metrics.jsonl``, ``timeline.json``, ``timeline.png``,
``loss.png``, ``summary.json``, ``checkpoints/`` (persistent copies), ``logs/`` (agents),
``events/`` (worker reports).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..errors import ScalaiError
from ..layout.ptc import PTC
from .ahead import drop_successor, maybe_prelaunch
from .allocation import Allocation, apply_event
from .control import ControlServer
from .events import events_dir, read_generation, reconfiguration_phases
from .faults import detect_dead_stores, fire_failures, fire_timed
from .launch import Agent, Rendezvous, process_gone, start_agents
from .persist import Persister
from .progress import MetricsTail, Progress, run_row
from .report import finish
from .spec import RunSpec
from .timeline import Reconfiguration
from .worker import free_file, stop_file

__all__ = ["Runner", "RunResult", "RunFailed"]

GRACE_S = 60.0  # after a failure, how long the survivors get to dump before they are killed


class RunFailed(ScalaiError):
    """The run cannot go on (the message says why and where the logs are)."""


@dataclass
class Generation:
    number: int
    alloc: Allocation
    until: int
    start_step: int
    agents: list[Agent]
    launched: float
    exited_at: float | None = None
    first_row: dict | None = None
    killed: list[tuple[str, Any, float]] = field(default_factory=list)  # (kind, target, time)
    successor: "Generation | None" = None  # started ahead of the change that ends this one


@dataclass
class _Pending:
    change: Reconfiguration
    request: float
    old: Generation
    marks: dict[str, tuple[float, float]]  # the runner's phases: (start, end) each
    go: float | None = None


@dataclass
class RunResult:
    """What a run produced (paths under ``out``)."""

    out: Path
    rows: list[dict]
    changes: list[Reconfiguration]
    final_step: int
    final_version: str | None
    checkpoint: str | None


class Runner:
    """Runs ``spec`` (see the module docstring); ``say`` gets every message line."""

    def __init__(self, spec: RunSpec, out: TextIO | None = None, report: bool = True):
        self.spec, self.dir, self.report = spec, Path(spec.out), report
        self.progress = Progress(spec.steps, out)
        self.pool, self.alloc = spec.pool(), spec.initial()
        self.changes: list[Reconfiguration] = []
        self.rows: list[dict] = []
        self.commits: list[dict] = []
        self.state = "starting"
        self.gen: Generation | None = None
        self._fired: set[int] = set()
        self._requests: list[tuple[str, Any, str, float]] = []
        self._lock = threading.Lock()
        self._pending: _Pending | None = None
        self._t0 = time.time()

    # -- public -----------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.progress.say(text)

    def status(self) -> dict:
        gen = self.gen
        return {"job": self.spec.job, "state": self.state, "step": self.rows[-1]["step"] if self.rows else 0,
                "steps": self.spec.steps, "layout": str(self.alloc.layout), "hosts": list(self.alloc.hosts),
                "devices": self.alloc.devices, "generation": gen.number if gen else None,
                "healthy_devices": self.pool.total, "reconfigurations": len(self.changes)}

    def request(self, action: str, value: Any) -> dict:
        """A change asked for now (control endpoint, time event); raises ValueError to refuse."""
        new = apply_event(self.alloc, self.pool, action, value, self.spec.chooser, self.spec.accepts)
        if new == self.alloc:
            raise ValueError(f"the job already runs {self.alloc.describe()}; nothing to change")
        reason = {"devices": f"scale to {value} devices", "layout": f"layout {value}",
                  "redeploy": "redeploy"}[action] + " (request)"
        with self._lock:
            self._requests.append((action, value, reason, time.time()))
        return {"action": action, "value": str(value) if action == "layout" else value,
                "layout": str(new.layout), "hosts": list(new.hosts)}

    def run(self) -> RunResult:
        if self.dir.exists() and any(self.dir.iterdir()):
            raise FileExistsError(f"run directory {self.dir} is not empty; choose a new --out")
        created = not self.dir.exists()
        for sub in ("events", "control", "logs", "workers"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.metrics_out = open(self.dir / "metrics.jsonl", "a")
        self.tail = MetricsTail(self.dir / "workers" / "metrics.jsonl")
        self._gens: list[Generation] = []
        started = False
        try:
            self._start_infrastructure()
            started = True
            return self._main()
        finally:
            self._shutdown()
            if created and not started:  # nothing ran: leave no half-made run directory behind
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- infrastructure ---------------------------------------------------------------
    def _start_infrastructure(self) -> None:
        from ..store.simnet import SimulatedHosts

        spec = self.spec
        self._prepare_data()
        self.hosts = SimulatedHosts(spec.hosts, link=spec.link, mode="transport").__enter__()
        self.rdzv = Rendezvous()
        self.control = ControlServer(self.status, self.request, spec.control_host, spec.control_port,
                                     spec.control_token)
        self.control.register(spec.job, self.dir, stores=self.hosts.root)
        self.persister = Persister(self._alive_urls, spec.job, self.dir / "checkpoints", self.hosts.token,
                                   on_error=lambda m: self.say(f"warning: {m}")) if spec.persist else None
        link = f", links {spec.link}" if spec.link else ""
        self.say(f"scalai run: job {spec.job} ({spec.model}), {spec.hosts} simulated hosts x "
                 f"{spec.gpus_per_host} devices (a store each{link}), {spec.steps} steps; control "
                 f"{self.control.url}; run directory {self.dir}")

    def _prepare_data(self) -> None:
        from ..examples.gpt.corpus import default_index_path, ensure_index
        from ..examples.gpt.model import preset

        seq_len = preset(self.spec.model).seq_len
        self.data_path = str(self.spec.data or default_index_path(seq_len))
        ensure_index(seq_len, self.data_path)

    def _shutdown(self) -> None:
        for gen in getattr(self, "_gens", []):
            for a in gen.agents:
                a.kill()
        if getattr(self, "persister", None):
            self.persister.close()
        if getattr(self, "control", None):
            self.control.close(self.spec.job)
        if getattr(self, "hosts", None):
            self.hosts.close()
        if getattr(self, "rdzv", None):
            self.rdzv.close()
        if getattr(self, "metrics_out", None):
            self.metrics_out.close()

    def _alive_urls(self) -> list[str]:
        return [u for h, u in zip(self.hosts.hosts, self.hosts.urls) if h not in self.pool.dead]

    def _cluster(self):
        from ..store import StoreCluster

        return StoreCluster(self._alive_urls(), self.hosts.token)

    # -- generations ------------------------------------------------------------------
    def _next_stop(self, after: int, alloc: Allocation) -> int:
        """The step a generation running ``alloc`` stops after: the next step event that
        changes something (events that would change nothing are dropped with a note)."""
        for e in self.spec.schedule:
            if e.step is None or e.index in self._fired or e.action == "fail" or e.step <= after:
                continue
            try:
                new = apply_event(alloc, self.pool, e.action, e.value, self.spec.chooser, self.spec.accepts)
            except ValueError as exc:
                self._note(e.index, f"event {e.index} ({e.describe()}) cannot be carried out now, skipped: {exc}")
                continue
            if new == alloc:
                self._note(e.index, f"event {e.index} ({e.describe()}) changes nothing for {alloc.describe()}; not a stop")
                continue
            return e.step
        return self.spec.steps

    def _note(self, key, text: str) -> None:
        """Say ``text`` once per ``key`` (events are looked at again at every launch)."""
        noted = self.__dict__.setdefault("_noted", set())
        if key not in noted:
            noted.add(key)
            self.say(text)

    def launch(self, alloc: Allocation, start_step: int, resume: bool, free: bool = True,
                activate: bool = True) -> Generation:
        """Start a generation's agents. ``free``: the devices are free now (else the caller
        calls :meth:`await_exit` for the previous generation). ``activate``: it is the
        running generation now (else it was started ahead: see :mod:`.ahead`)."""
        from ..examples.gpt.options import to_argv

        spec, number = self.spec, len(self._gens)
        until = self._next_stop(start_step, alloc)
        opts = spec.trainer_options(alloc.layout, steps=until, metrics=str(self.dir / "workers" / "metrics.jsonl"),
                                    log_every=10**9)
        opts = type(opts)(**{**opts.__dict__, "data": self.data_path})
        urls = dict(zip(self.hosts.hosts, self.hosts.urls))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
               "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "SCALAI_TOKEN": self.hosts.token,
               "SCALAI_RUN_DIR": str(self.dir), "SCALAI_GENERATION": str(number),
               "SCALAI_HOSTS": ",".join(alloc.hosts), "SCALAI_GPUS_PER_HOST": str(spec.gpus_per_host),
               "SCALAI_STORES": ",".join(f"{h}={urls[h]}" for h in alloc.hosts), "SCALAI_JOB": spec.job,
               "SCALAI_RESUME": "1" if resume else "0", "SCALAI_COMMIT_EVERY": str(spec.commit_every),
               "SCALAI_DUMP_VERSION": f"rescue-g{number:03d}", "SCALAI_TIMEOUT": str(spec.worker_timeout),
               # nothing to transform into (a fresh start), or a PTC known already: no announcement
               "SCALAI_ANNOUNCE": "0" if not resume or self.known_ptc(alloc.layout) is not None else "1"}
        host_env = {h: {"SCALAI_HOST": h} for h in alloc.hosts}
        agents = start_agents(alloc.hosts, [alloc.local_size(h) for h in alloc.hosts], self.rdzv.endpoint,
                              f"{spec.job}-g{number:03d}", spec.module, to_argv(opts), env, host_env,
                              self.dir / "logs")
        gen = Generation(number, alloc, until, start_step, agents, time.time())
        if free:
            free_file(self.dir, number).touch()
        self._gens.append(gen)
        if activate:
            self.activate(gen)
        return gen

    def known_ptc(self, layout) -> PTC | None:
        """The job's PTC under ``layout`` if this run saw it under a layout that uses the same
        parallel axes (what a generation reported when ready, or announced), relaid out to
        ``layout``'s degrees; else None.

        Described from DTensor placements, a job's split rules depend on which axes are in
        use (tp > 1, dp > 1, sharding over dp), not on their degrees, so the relayout is
        exact; should a script differ, a load still fills every element exactly once (from
        a less convenient layout)."""
        cache = self.__dict__.setdefault("_seen_ptcs", {})
        for path in sorted(Path(self.dir, "events").glob("g*/*.json")):
            if path.name in ("ptc.json", "layout.json") and str(path) not in cache:
                try:
                    cache[str(path)] = PTC.from_json(json.loads(path.read_text()))
                except (OSError, ValueError, KeyError):
                    continue  # being written: read it next time
        for ptc in cache.values():
            if axes_in_use(ptc.config) == axes_in_use(layout):
                return ptc.relayout(layout) if ptc.config != layout else ptc
        return None

    def activate(self, gen: Generation) -> None:
        self.gen, self.alloc, self.state = gen, gen.alloc, "running"

    def allocation_after(self, alloc: Allocation, actions) -> Allocation | None:
        """The allocation after ``[(action, value)]``, or None if one cannot be met."""
        try:
            for action, value in actions:
                alloc = apply_event(alloc, self.pool, action, value, self.spec.chooser, self.spec.accepts)
        except ValueError:
            return None
        return alloc

    def due(self, step: int) -> list:
        return [e for e in self.spec.schedule if e.step == step and e.index not in self._fired
                and e.action != "fail"]

    def _add_row(self, raw: dict, gen: Generation) -> None:
        row = run_row(raw, gen.number)
        self.rows.append(row)
        self.metrics_out.write(json.dumps(row) + "\n")
        self.metrics_out.flush()
        if gen.first_row is None:
            gen.first_row = row
            self._complete_pending(gen)
        self.progress.step(row)

    def _complete_pending(self, gen: Generation) -> None:
        p = self._pending
        if p is None:
            return
        if self.persister is not None:
            self.persister.hold(False)  # held since the reconfiguration began
        first_end = gen.first_row["time"] if gen.first_row else None
        durations, starts, downtime = reconfiguration_phases(
            p.request, read_generation(self.dir, p.old.number), p.old.exited_at or p.marks["allocate"][0],
            p.marks, read_generation(self.dir, gen.number), first_end, p.go)
        p.change.phases, p.change.starts, p.change.measured_downtime = durations, starts, downtime
        self.changes.append(p.change)
        self._pending = None
        c = p.change
        self.say(f"  back at step {c.at_step + 1} in {c.to_layout} after {downtime:.1f} s down (" +
                 ", ".join(f"{k} {v:.2f}" for k, v in durations.items()) + " s)")

    # -- the loop ---------------------------------------------------------------------
    def _main(self) -> RunResult:
        from .transitions import Outcome, reconfigure, recover

        for e in self.spec.schedule:  # step-0 events shape the start
            if e.step == 0 and e.action != "fail":
                self._fired.add(e.index)
                self.alloc = apply_event(self.alloc, self.pool, e.action, e.value, self.spec.chooser,
                                         self.spec.accepts)
        gen = self.launch(self.alloc, 0, resume=False)
        self.say(f"generation 0: {gen.alloc.describe()}, steps 1-{gen.until}")
        stuck = 0
        while True:
            outcome: Outcome = self._watch(gen)
            if outcome.kind == "done":
                break
            if outcome.kind == "stopped":
                gen = reconfigure(self, gen, outcome)
                stuck = 0
            else:
                stuck = stuck + 1 if gen.first_row is None else 0
                if stuck >= 2:
                    raise RunFailed(f"generation {gen.number} failed without completing a step, twice in a "
                                    f"row; see {gen.agents[0].log.parent}:\n{outcome.logs}")
                gen = recover(self, gen, outcome)
        return finish(self, outcome)

    def _watch(self, gen: Generation):
        """Follow ``gen`` until its agents have exited; returns what happened."""
        from .transitions import Outcome

        stop_at: float | None = None
        failed_at: float | None = None
        while True:
            for raw in self.tail.read():
                self._add_row(raw, gen)
            self._poll_commits(gen)
            fire_failures(self, gen)
            fire_timed(self)
            detect_dead_stores(self, gen)
            with self._lock:
                asked = bool(self._requests)
            if asked and stop_at is None:
                stop_at = time.time()
                stop_file(self.dir, gen.number).touch()
            if failed_at is None:
                maybe_prelaunch(self, gen, stop_at is not None)
            codes = [a.poll() for a in gen.agents]
            if failed_at is None and (gen.killed or any(c not in (None, 0) for c in codes)):
                failed_at = gen.killed[0][2] if gen.killed else time.time()
                drop_successor(gen)
            if failed_at is not None and time.time() - failed_at > GRACE_S:
                for a in gen.agents:
                    a.kill()
            if all(c is not None for c in codes):
                gen.exited_at = time.time()
                break
            if failed_at is None and self._saved(gen):
                break  # the state is in the stores; the old processes exit while the new start
            time.sleep(0.05)
        for raw in self.tail.read():
            self._add_row(raw, gen)
        self._poll_commits(gen)
        reports = read_generation(self.dir, gen.number)
        if failed_at is None and all(c in (0, None) for c in codes):
            saved = reports.get(0, {}).get("saved") or {}
            step = saved.get("step", gen.start_step)
            kind = "done" if step >= self.spec.steps else "stopped"
            return Outcome(kind, step, saved.get("version"), saved.get("bytes", 0), stop_at)
        logs = "\n".join(f"[{a.host}] {a.tail(8)}" for a in gen.agents if a.poll() not in (0, None))
        return Outcome("failed", None, None, 0, failed_at, logs)

    def _saved(self, gen: Generation) -> bool:
        """Every worker saved before the last step of the job: the next generation may start."""
        reports = read_generation(self.dir, gen.number)
        saved = reports.get(0, {}).get("saved")
        return bool(saved) and saved["step"] < self.spec.steps and all(
            "save_end" in reports.get(r, {}).get("times", {}) for r in range(gen.alloc.devices))

    def await_exit(self, old: Generation, new: Generation) -> None:
        """In the background: wait for ``old``'s agents to exit (kill them after a grace
        period), then free the devices for ``new``."""
        def wait() -> None:
            deadline = time.time() + GRACE_S
            # The devices are free once the old workers are gone (their agents take longer
            # to shut down, and hold no device).
            pids = [r.get("pid") for r in read_generation(self.dir, old.number).values()]
            while pids and all(pids) and not all(process_gone(p) for p in pids) \
                    and any(a.poll() is None for a in old.agents) and time.time() < deadline:
                time.sleep(0.01)
            if pids and all(pids) and all(process_gone(p) for p in pids):
                free_file(self.dir, new.number).touch()
            for a in old.agents:
                if a.wait(max(0.1, deadline - time.time())) is None:
                    a.kill()
                    a.wait(10)
            old.exited_at = time.time()
            free_file(self.dir, new.number).touch()
            bad = [a.host for a in old.agents if a.poll() not in (0, None)]
            if bad:
                self.say(f"warning: generation {old.number}'s agents on {', '.join(bad)} exited with an error "
                         f"after saving (see {old.agents[0].log.parent})")

        threading.Thread(target=wait, name="scalai-exit", daemon=True).start()

    def _poll_commits(self, gen: Generation) -> None:
        report = read_generation(self.dir, gen.number).get(0) if self.spec.commit_every else None
        for c in (report or {}).get("commits", []):
            if not any(k["version"] == c["version"] for k in self.commits):
                self.record_commit(c["version"], c["step"], gen.alloc.hosts)

    def record_commit(self, version: str, step: int, hosts) -> None:
        """A committed version exists in the stores: persist it, drop what it supersedes."""
        self.commits.append({"version": version, "step": step, "hosts": list(hosts), "dropped": False})
        if self.persister is not None:
            self.persister.submit(version, step)
        self.retain()

    def retain(self) -> None:
        """Drop committed versions older than the newest (unless a persistent copy is
        being made of them): the newest is where a failure without replicas restarts."""
        keep = {self.commits[-1]["version"]} if self.commits else set()
        if self.persister is not None:
            keep |= self.persister.in_use()
        stale = [c for c in self.commits if not c["dropped"] and c["version"] not in keep]
        if stale:
            cluster = self._cluster()
            for c in stale:
                cluster.drop(self.spec.job, c["version"])
                c["dropped"] = True

    def take_requests(self) -> list[tuple[str, Any, str, float]]:
        with self._lock:
            out, self._requests = self._requests, []
        return out

    # -- the end ----------------------------------------------------------------------

def axes_in_use(layout) -> tuple[bool, bool, bool]:
    """Which parallel axes ``layout`` uses (pure): tensor parallel, data parallel, and
    sharding over the data-parallel ranks."""
    return layout.tp > 1, layout.dp > 1, layout.dp > 1 and bool(layout.zero)


def ptc_of(run_dir: Path, generation: int) -> PTC:
    """The PTC rank 0 of ``generation`` reported (its layout's tensors)."""
    return PTC.from_json(json.loads((events_dir(run_dir, generation) / "ptc.json").read_text()))
