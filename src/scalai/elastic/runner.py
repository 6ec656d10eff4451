"""The elastic runner's shell: agents, stores, threads and time around the pure controller.

``Runner(spec, machines).run()`` (CLI: ``scalai run``) keeps one job going over a changing
set of machines. Its agents (:mod:`.agent`) join the coordinator's service
(:mod:`.coordinator`); everything they send becomes a controller event
(:mod:`.messages`), fed one at a time to :func:`.controller.step`, and every action it
hands back is carried out here, in order:

- ``Launch``: a c10d ``TCPStore`` for the generation's rendezvous (held here; workers are
  its clients), then a ``launch`` command to every agent of its hosts (their ranks);
- ``Signal`` / ``Kill`` / ``CrashHost`` / ``Release``: commands to agents;
- ``Transform`` / ``RecoverDump`` / ``Restore``: on a thread, against the stores
  (:mod:`.stores_io`); the result comes back as an event;
- ``Drop`` / ``Fence`` / ``HoldDump``: store calls on a thread (a fence makes the stores
  refuse the writers of older generations; a held dump's lease is renewed until it is
  committed or dropped); ``Persist`` / ``HoldPersist``: the persistent copy (:mod:`.persist`);
- ``Record`` / ``Say`` / ``Finish`` / ``Fail``: the timeline (``timeline.json`` rewritten at
  each change, so a coordinator that is killed leaves the changes it saw), the progress
  output, the end.

Time passes as ``Tick`` events (10 per second); agents unheard of for the detection time
become ``AgentDead`` events, and so do agents silent for a heartbeat and a half whose
store refuses connections (:data:`SUSPECT_HEARTBEATS`: a machine whose processes were
killed closes its sockets, and its store only exits with its agent; a frozen or cut-off
machine accepts or times out, and waits for the detection time). The run directory holds only what the coordinator received:
``metrics.jsonl``, ``timeline.json`` and the plots, ``summary.json``, ``logs/`` (log tails
the agents sent), ``events/gNNN/`` (each worker's last report, ``exits.json``: their exit
statuses, ``ptc.json``: the job's description under the generation's layout),
``checkpoints/`` (persistent copies pulled from the stores).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import ScalaiError
from ..layout.ptc import PTC
from ..tls import plain_warning
from . import controller
from .coordinator import AgentService
from .jobstate import Policy
from .machines import LocalMachines, Machines
from .messages import (AgentDead, AgentGone, AgentInfo, AgentJoined, AgentLeaving, Announced, CrashHost, Drop, Fail,
                       Fence, Finish, HoldDump, HoldPersist, Kill, Launch, Persist, PersistedInfo, PersistStatus, RankReport,
                       RecoverDump, Record, Release, Restore, Resume, Say, ScaleRequested, Signal, Start, StepDone,
                       StoredInfo, Tick, Transform, TransformFailed, WorkerExited)
from .progress import Progress, run_row
from .timeline import Reconfiguration

__all__ = ["Runner", "RunResult", "RunFailed"]

TICK_S = 0.1
#: Heartbeats an agent may miss before the coordinator probes its store's port.
SUSPECT_HEARTBEATS = 1.5


class RunFailed(ScalaiError):
    """The run cannot go on (the message says why, with the failed workers' log tails)."""


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
    """Runs ``spec`` (a :class:`~.spec.RunSpec`) on its machines (see the module docstring).

    Args:
        out: where progress goes (default: standard output).
        report: print the timeline table at the end.
        machines: the agents (default: ``spec.machines()``: started here, or joining).
    """

    def __init__(self, spec, out: TextIO | None = None, report: bool = True, machines: Machines | None = None):
        from .wire import split_address

        self.spec = spec
        self.job, self.steps, self.dir = spec.job, spec.steps, Path(spec.out)
        self.machines = machines or spec.machines()
        self.listen = split_address(spec.listen, "--listen") if spec.listen else ("127.0.0.1", 0)
        self.control_token = spec.token
        self.dead_after, self.heartbeat = spec.dead_after, min(1.0, spec.dead_after / 4)
        self.persist_enabled, self.report = spec.persist, report
        self.progress = Progress(self.steps, out)
        self.queue: queue.Queue = queue.Queue()
        self._probed: dict[str, float] = {}  # agent -> when its store was last probed (monotonic)
        self.state = None
        self.policy: Policy | None = None
        self.rows: list[dict] = []
        self.changes: list[Reconfiguration] = []
        self._seen_rows: set[tuple[int, int]] = set()
        self._agents: dict[str, Any] = {}  # host -> AgentRecord of data-ready agents
        self._rdzv: dict[int, Any] = {}
        self._store_ops = queue.Queue()
        self._finished: Finish | None = None
        self._failed: Fail | None = None
        self._persisted = (0, None)
        self._fence = 0  # the generation the stores were last fenced at (store thread)
        self._dump_leases: dict = {}  # generation -> the Lease holding its survivors' dump (store thread)
        self._t0 = time.time()
        self._trace = None
        self._deferred: list[tuple] = []
        self._exits: dict[int, dict[str, int]] = {}  # generation -> {rank: exit status}

    # -- public -----------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.progress.say(text)

    def status(self) -> dict:
        s = self.state
        if s is None:
            return {"job": self.job, "state": "waiting for agents", "agents": len(self._agents)}
        return {"job": self.job, "state": s.phase, "step": s.last_logged, "steps": self.steps,
                "layout": str(s.alloc.layout), "hosts": list(s.alloc.hosts), "devices": s.alloc.devices,
                "generation": s.current, "healthy_devices": s.pool.total, "reconfigurations": len(self.changes),
                "agents": sorted(self._agents)}

    def scale(self, body: Any) -> dict:
        """``POST /v1/scale`` (from a server thread): checked against the state now, queued."""
        from .control import parse_request

        action, value = parse_request(body)
        if self.state is None or self.policy is None:
            raise ValueError("the job has not started yet (waiting for its agents); ask again later")
        accepted = controller.check_request(self.policy, self.state, action, value)
        reason = controller.request_reason(action, value)
        self.queue.put(("event", ScaleRequested(time.time(), action, value, reason)))
        return accepted

    def run(self) -> RunResult:
        if self.dir.exists() and any(self.dir.iterdir()):
            raise FileExistsError(f"run directory {self.dir} is not empty; choose a new --out")
        created = not self.dir.exists()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        if os.environ.get("SCALAI_TRACE"):
            self._trace = open(self.dir / "trace.log", "a")  # every event and action, for debugging
        started = False
        try:
            self._start()
            started = True
            return self._loop()
        finally:
            self._shutdown()
            if created and not started:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- start ------------------------------------------------------------------------
    def _start(self) -> None:
        host, port = self.listen
        self.service = AgentService(self.queue.put, self.spec.welcome(), self.status, self.scale, host, port,
                                    self.machines.token, self.control_token, tls=self.spec.tls, heartbeat_s=self.heartbeat,
                                    dead_after_s=self.dead_after)
        self._register()
        threading.Thread(target=self._store_worker, name="scalai-store-ops", daemon=True).start()
        warning = plain_warning("the coordinator", host, self.spec.tls)
        if warning:
            self.say(warning)
        self.machines.start(self.service.url)
        self.say(f"scalai run: job {self.job}, {self.steps} steps; coordinator {self.service.url}; waiting for "
                 f"{self.machines.describe()}")
        agents = self._quorum()
        self.policy = self.spec.policy(agents[0].devices)
        infos = tuple(AgentInfo(a.name, a.devices, a.kind, a.memory_gib) for a in agents)
        self.state = controller.initial_state(self.policy, infos, resume=self.spec.resume)
        if not self.spec.resume and self.spec.agents is not None:  # the schedule against the machines that came
            from .spec import dry_run

            dry_run(self.policy, self.state.pool)
        from .persist import Persister

        self.persister = Persister(self._alive_urls, self.job, self.spec.persist_to or self.dir / "checkpoints",
                                   self.machines.token, tls=self.spec.tls, on_error=lambda m: self.say(f"warning: {m}")) if self.persist_enabled else None
        if self.spec.resume:
            self._feed(self._resume_event(agents))
        else:  # a new job: what its stores hold under its name is from an earlier run
            self._wipe([a.store for a in agents])
            self._feed(Start(time.time(), infos))

    def _wipe(self, urls: list[str]) -> None:
        from ..store import StoreClient

        for url in urls:
            try:
                StoreClient(url, self.machines.token, retries=2, tls=self.spec.tls).delete(self.job)
            except ScalaiError:
                pass  # nothing of the job there

    def _register(self) -> None:
        from .control import register

        extra = {"agents_root": str(self.machines.root)} if isinstance(self.machines, LocalMachines) else {}
        register(self.job, self.service.url, self.dir, **extra)

    def _quorum(self) -> list:
        """Wait until the expected agents have joined with their data ready."""
        deadline = time.time() + self.spec.quorum_timeout
        while len(self._agents) < self.machines.expected:
            if time.time() > deadline and self.spec.resume and self._agents:
                self.say(f"only {len(self._agents)} of {self.machines.expected} agents came back within "
                         f"{self.spec.quorum_timeout:.0f} s; continuing with them")
                break
            if time.time() > deadline:
                have = ", ".join(sorted(self._agents)) or "none"
                raise RunFailed(f"only {len(self._agents)} of {self.machines.expected} agents joined within "
                                f"{self.spec.quorum_timeout:.0f} s (joined: {have}); start 'scalai agent --join "
                                f"{self.service.url.split('://')[1]} ...' on the machines")
            self._check_local_agents()
            try:
                item = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._item(item, starting=True)
        return [self._agents[h] for h in sorted(self._agents)][: max(self.machines.expected, len(self._agents))]

    def _check_local_agents(self) -> None:
        if isinstance(self.machines, LocalMachines):
            for name, proc in self.machines.procs.items():
                if proc.poll() is not None and name not in self._agents:
                    raise RunFailed(f"agent {name} exited before joining:\n{self.machines.agent_log(name)}")

    def _resume_event(self, agents) -> Resume:
        """What a coordinator started again finds: the committed versions of the job in the
        agents' stores (each with its manifest), the last step and generation reported (or
        fenced off in the stores)."""
        from ..store import StoreCluster
        from ..store.manifest import VersionManifest

        cluster = StoreCluster([a.store for a in agents], self.machines.token, tls=self.spec.tls)
        stored = []
        seen: dict[str, set] = {}
        fence = 0  # the stores' fence: new generations go at or above it (fences only rise: 0 reads it)
        for host in cluster.hosts:
            try:
                fence = max(fence, int(cluster.client(host).fence(self.job, 0)["generation"]))
                versions = cluster.client(host).job(self.job)["versions"]
            except ScalaiError:
                continue
            for v in versions:
                if v["committed"]:
                    seen.setdefault(v["version"], set()).add(host)
        for name, hosts in seen.items():
            raw = cluster.client(sorted(hosts)[0]).version(self.job, name, tensors=False)["manifest"]
            m = VersionManifest.from_json(raw)
            if m.scratch or m.lost_ranks or not set(m.hosts) <= hosts:
                continue
            stored.append(StoredInfo(name, int(m.state.get("step", 0)), m.ptc.config, tuple(m.hosts), m.sequence,
                                     m.ptc.full))
        last_step = max((a.last_step for a in agents), default=0)
        last_gen = max([a.last_generation for a in agents] + [fence - 1])
        infos = tuple(AgentInfo(a.name, a.devices, a.kind, a.memory_gib) for a in agents)
        return Resume(time.time(), infos, tuple(stored), last_step, last_gen)

    # -- the loop ---------------------------------------------------------------------
    def _loop(self) -> RunResult:
        last_tick = 0.0
        deferred, self._deferred = self._deferred, []
        for item in deferred:
            self._item(item)
        while self._finished is None and self._failed is None:
            try:
                item = self.queue.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            while item is not None:
                self._item(item)
                if self._finished or self._failed:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    item = None
            now = time.time()
            for host in self.service.overdue():
                self._feed(AgentDead(now, host, f"no heartbeat for {self.dead_after:g} s"))
            self._probe_silent()
            self._persist_status()
            if now - last_tick >= TICK_S:
                last_tick = now
                self._feed(Tick(now))
        self._drain()
        if self._failed is not None:
            raise RunFailed(self._failed.message + self._log_tails(self._failed.generation))
        return self._finish(self._finished)

    def _probe_silent(self) -> None:
        """Probe the store of every agent silent for :data:`SUSPECT_HEARTBEATS` heartbeats
        (once a second each, on a thread of its own); a refusal declares it dead now."""
        from .wire import refuses_connections

        silent_for = SUSPECT_HEARTBEATS * self.heartbeat
        now = time.monotonic()
        for name, url in self.service.silent(silent_for):
            if now - self._probed.get(name, 0.0) < 1.0:
                continue
            self._probed[name] = now

            def probe(name: str = name, url: str = url) -> None:
                if refuses_connections(url) and self.service.declare_dead(name, silent_for):
                    self.queue.put(("event", AgentDead(time.time(), name, f"its store refuses connections, "
                                                                          f"no heartbeat for {silent_for:g} s")))

            threading.Thread(target=probe, name=f"scalai-probe-{name}", daemon=True).start()

    def _drain(self, wait: float = 0.5) -> None:
        """The run is over: keep what is still on its way (rows, log tails) for the outputs."""
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item[0] in ("row", "logs"):
                self._item(item)

    def _feed(self, event) -> None:
        self.state, actions = controller.step(self.policy, self.state, event)
        if self._trace is not None and (actions or not isinstance(event, Tick)):
            self._trace.write(f"{time.time() - self._t0:9.3f} {_brief(event)}\n"
                              + "".join(f"{'':10}-> {_brief(a)}\n" for a in actions))
            self._trace.flush()
        for action in actions:
            self._perform(action)

    def _item(self, item: tuple, starting: bool = False) -> None:
        kind, now = item[0], time.time()
        if kind == "joined":
            return  # counted once its data report arrives
        if kind == "data":
            self._joined(item[1], item[2], starting)
            return
        if starting:  # the job has not started: keep it for then (e.g. rows sent again after a restart)
            self._deferred.append(item)
            return
        if kind == "event":
            self._feed(item[1])
        elif kind == "row":
            gen, raw = item[1], item[2]
            if (gen, raw.get("step")) in self._seen_rows:
                return
            self._seen_rows.add((gen, raw.get("step")))
            row = run_row(raw, gen)
            self.rows.append(row)
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.progress.step(row)
            self._feed(StepDone(now, gen, int(row["step"]), float(row.get("time") or now)))
        elif kind == "report":
            from .events import rank_file, write_json_atomic

            write_json_atomic(rank_file(self.dir, item[1], item[2]), item[3])  # kept as received
            self._feed(RankReport(now, item[1], item[2], item[3]))
        elif kind == "ptc":
            try:
                ptc = PTC.from_json(item[3])
            except (ValueError, KeyError, TypeError) as exc:
                self.say(f"warning: generation {item[1]} described an unreadable PTC ({exc}); ignored")
                return
            from .events import events_dir, write_json_atomic

            # kept as received: the job's description under each layout (ready: the live job's)
            write_json_atomic(events_dir(self.dir, item[1]) / ("ptc.json" if item[2] else "layout.json"), item[3])
            self._feed(Announced(now, item[1], ptc, ready=item[2]))
        elif kind == "exit":
            from .events import events_dir, write_json_atomic

            self._exits.setdefault(item[1], {})[str(item[2])] = item[3]
            write_json_atomic(events_dir(self.dir, item[1]) / "exits.json", self._exits[item[1]])
            self._feed(WorkerExited(now, item[1], item[2], item[3]))
        elif kind == "logs":
            for gen, ranks in item[2].items():
                for rank, text in ranks.items():
                    with open(self.dir / "logs" / f"g{int(gen):03d}-rank{int(rank)}.log", "a") as f:
                        f.write(text + "\n")
        elif kind == "leaving":
            self._feed(AgentLeaving(now, item[1]))

    def _joined(self, host: str, data: dict, starting: bool) -> None:
        record = self.service.agents.get(host)
        if record is None:
            return
        if data.get("error"):
            self.say(f"warning: agent {host} is not used: {data['error']}")
            return
        self._agents[host] = record
        if starting:
            return
        # A machine that joins a running job holds nothing the job may use: one declared dead
        # that came back (fenced out), or one that ran the job under an older coordinator.
        # Its store is emptied of the job before the job counts on it.
        info = AgentInfo(host, record.devices, record.kind, record.memory_gib)
        self._store_ops.put(("wipe", host, AgentJoined(time.time(), info), record.store))

    # -- actions ----------------------------------------------------------------------
    def _perform(self, a) -> None:
        if isinstance(a, Launch):
            self._launch(a)
        elif isinstance(a, Signal):
            hosts = a.hosts or self._gen_hosts(a.generation)
            for h in hosts:
                self.service.send(h, "signal", generation=a.generation, what=a.what, version=a.version)
        elif isinstance(a, Kill):
            g = self.state.gens.get(a.generation)
            hosts = self._gen_hosts(a.generation)
            if g is not None and a.ranks is not None:
                hosts = sorted({g.alloc.host(r) for r in a.ranks})
            for h in hosts:
                self.service.send(h, "kill", generation=a.generation, ranks=list(a.ranks) if a.ranks else None)
        elif isinstance(a, CrashHost):
            self.machines.crash(a.host, self.service)
        elif isinstance(a, Release):
            self.service.send(a.host, "release")
            self.service.mark(a.host, "released")
            self._agents.pop(a.host, None)
            self.say(f"agent {a.host} released: the job holds nothing on it")
            self.queue.put(("event", AgentGone(time.time(), a.host)))
        elif isinstance(a, (Transform, RecoverDump, Restore)):
            urls = self._store_urls(list(a.alloc.hosts) if isinstance(a, Restore) else None)
            threading.Thread(target=self._transform, args=(a, urls), name="scalai-transform", daemon=True).start()
        elif isinstance(a, Drop):
            self._store_ops.put(("drop", a.version, self._store_urls()))
        elif isinstance(a, Fence):
            self._store_ops.put(("fence", a.generation, self._store_urls(a.hosts)))
        elif isinstance(a, HoldDump):
            self._store_ops.put(("hold", a.generation, self._store_urls()))
        elif isinstance(a, Persist):
            if self.persister is not None:
                self.persister.submit(a.version, a.step)
        elif isinstance(a, HoldPersist):
            if self.persister is not None:
                self.persister.hold(a.held)
        elif isinstance(a, Record):
            from .timeline import write_timeline

            self.changes.append(a.change)
            write_timeline(self.dir / "timeline.json", self.changes)
        elif isinstance(a, Say):
            self.say(a.text)
        elif isinstance(a, Finish):
            self._finished = a
        elif isinstance(a, Fail):
            self._failed = a

    def _gen_hosts(self, generation: int) -> list[str]:
        g = self.state.gens.get(generation)
        return [h for h in g.alloc.hosts if h not in self.state.pool.dead] if g is not None else []

    def _launch(self, a: Launch) -> None:
        from torch.distributed import TCPStore

        store = TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
        self._rdzv[a.generation] = store
        for gone in [n for n in self._rdzv if n not in self.state.gens]:
            self._rdzv.pop(gone, None)  # their workers are all gone: close the rendezvous
        alloc, p, trainer = a.alloc, self.policy, self.spec.trainer
        stores = ",".join(f"{h}={self._agents[h].store}" for h in alloc.hosts if h in self._agents)
        env = {**self.spec.worker_env(), "SCALAI_GENERATION": str(a.generation), "SCALAI_HOSTS": ",".join(alloc.hosts),
               "SCALAI_GPUS_PER_HOST": str(p.gpus_per_host), "SCALAI_STORES": stores, "SCALAI_JOB": self.job,
               "SCALAI_RESUME": "1" if a.resume else "0", "SCALAI_DUMP_VERSION": p.dump_version(a.generation),
               "SCALAI_ANNOUNCE": "1" if a.announce else "0"}
        for slot, host in enumerate(alloc.hosts):
            data = self._agents[host].data or {} if host in self._agents else {}
            metrics = f"{data.get('run_dir', '.')}/metrics/g{a.generation:03d}.jsonl"  # on that machine
            self.service.send(host, "launch", generation=a.generation, ranks=alloc.ranks_on(host),
                              module=trainer.module,
                              argv=trainer.argv(alloc.layout, a.until, metrics, data.get("path")),
                              env={**env, **trainer.env(alloc.layout, a.until, metrics)}, store_port=store.port,
                              run_id=f"{self.job}-g{a.generation:03d}", world=alloc.devices, slot=slot,
                              slots=len(alloc.hosts), free=a.free)

    def _alive_urls(self) -> list[str]:
        dead = self.state.pool.dead if self.state is not None else frozenset()
        return [r.store for h, r in list(self._agents.items()) if h not in dead]

    def _store_urls(self, hosts=None) -> list[str]:
        """The stores of ``hosts`` (in that order), or of every live machine (main thread)."""
        dead = self.state.pool.dead
        names = hosts if hosts is not None else [h for h in self._agents if h not in dead]
        return [self._agents[h].store for h in names if h in self._agents]

    def _cluster(self, urls: list[str]):
        from ..store import StoreCluster

        return StoreCluster(urls, self.machines.token, tls=self.spec.tls)

    def _transform(self, a, urls: list[str]) -> None:
        from . import stores_io

        try:
            if isinstance(a, Restore):
                t0 = time.time()
                version, moved = stores_io.restore(self._cluster(urls), a.path, a.alloc, self.job, a.generation)
                event = stores_io.done(a.token, version, moved, moved, (t0, t0), (t0, time.time()))
            else:
                cluster = self._cluster(urls)
                if isinstance(a, RecoverDump):
                    stores_io.commit_dump(cluster, self.job, a)
                    self._store_ops.put(("unhold", a.dump_generation))  # committed: no lease needed
                event = stores_io.transform(cluster, self.job, a.source if isinstance(a, Transform) else a.dump_version,
                                            a.alloc, a.target, a.lost, a.token, a.generation)
        except Exception as exc:  # noqa: BLE001 - the controller decides what follows
            event = TransformFailed(time.time(), a.token, f"{type(exc).__name__}: {exc}")
        self.queue.put(("event", event))

    def _store_worker(self) -> None:
        while True:
            op = self._store_ops.get()
            if op is None:
                for generation in list(self._dump_leases):
                    self._unhold(generation)
                return
            try:
                if op[0] == "drop":
                    for generation in [g for g in self._dump_leases if self.policy.dump_version(g) == op[1]]:
                        self._unhold(generation)
                    self._cluster(op[2]).drop(self.job, op[1])
                elif op[0] == "wipe":  # a joiner's store: emptied of the job, then fenced like the others
                    self._wipe([op[3]])
                    if self._fence:
                        self._cluster([op[3]]).fence(self.job, self._fence)
                    self.queue.put(("event", op[2]))
                elif op[0] == "fence":
                    self._fence = max(self._fence, op[1])
                    self._cluster(op[2]).fence(self.job, op[1])
                elif op[0] == "hold":  # the survivors' dump: kept alive until committed or dropped
                    from ..store.lease import Lease
                    from .recovery import dump_owner

                    if op[1] not in self._dump_leases:
                        self._dump_leases[op[1]] = Lease(self._cluster(op[2]), self.job, dump_owner(op[1]))
                    lease = self._dump_leases[op[1]]
                    lease.hold(self.policy.dump_version(op[1]), lease.cluster.hosts)
                elif op[0] == "unhold":
                    self._unhold(op[1])
            except Exception as exc:  # noqa: BLE001 - a store op failing is reported, not fatal
                self.say(f"warning: store operation {op[0]} failed: {exc}")

    def _unhold(self, generation: int) -> None:
        lease = self._dump_leases.pop(generation, None)
        if lease is not None:
            lease.close()

    def _persist_status(self) -> None:
        if self.persister is None:
            return
        latest = self.persister.latest()
        key = (len(self.persister.done), self.persister.busy, frozenset(self.persister.in_use()))
        if key == self._persisted:
            return
        self._persisted = key
        info = PersistedInfo(latest.version, latest.step, str(latest.path)) if latest else None
        self._feed(PersistStatus(time.time(), frozenset(self.persister.in_use()), info))

    # -- the end ----------------------------------------------------------------------
    def _log_tails(self, generation: int | None) -> str:
        if generation is None:
            return ""
        texts = []
        for path in sorted((self.dir / "logs").glob(f"g{generation:03d}-rank*.log")):
            lines = path.read_text(errors="replace").splitlines()[-8:]
            texts.append(f"[{path.stem}] " + "\n".join(lines))
        return ("; see " + str(self.dir / "logs") + ":\n" + "\n".join(texts)) if texts else ""

    def _finish(self, finish: Finish) -> RunResult:
        from .report import write_outputs


        if self.persister is not None:
            self.persister.wait_idle(120)
        for host in list(self._agents):  # the job is done (and copied to disk): its agents may go
            self.service.send(host, "release", reason="the job is done")
        latest = self.persister.latest() if self.persister else None
        # a step's row of the newest generation is the one that counts (rows of generations
        # given up on may arrive late, e.g. sent again after a coordinator restart)
        ordered = sorted(self.rows, key=lambda r: r["generation"])
        rows = write_outputs(self.dir, self.job, ordered, self.changes, finish.step, finish.version,
                             str(latest.path) if latest else None, time.time() - self._t0, self.state.alloc,
                             self.say, self.report)
        return RunResult(self.dir, rows, self.changes, finish.step, finish.version,
                         str(latest.path) if latest else None)

    def _shutdown(self) -> None:
        if getattr(self, "persister", None):
            self.persister.close()
        self._store_ops.put(None)
        if getattr(self, "service", None):
            if self._finished is not None:
                self.service.delivered(5.0)  # the agents heard that the job is done
            self.service.close()
        self.machines.close()
        self._rdzv.clear()
        from .control import unregister

        unregister(self.job)


def _brief(obj) -> str:
    """One line for the trace (``SCALAI_TRACE=1``): the type and its short fields."""
    from dataclasses import fields

    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "now" or hasattr(value, "specs"):
            continue
        text = str(value) if not isinstance(value, dict) else "{" + ",".join(map(str, list(value)[:8])) + "}"
        parts.append(f"{f.name}={text[:120]}")
    return f"{type(obj).__name__}(" + ", ".join(parts) + ")"
