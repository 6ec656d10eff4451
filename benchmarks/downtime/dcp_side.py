"""The PyTorch baseline of the downtime benchmark: DCP save, a new torchrun, DCP load.

The driver (this module) starts one torchrun agent per simulated host the layout uses
(``torchrun --nnodes H --nproc-per-node 2 --rdzv-backend c10d``, as on real hosts and as
scalai's runner does) with the old role of :mod:`.dcp_worker` at A, and the same at B with
the new role when the scenario allows (the same moment scalai's runner would start its new
agents):

- ``ahead``: once the old job's steps reach the start-ahead rule
  (:func:`~.harness.ahead_due`);
- ``at_request``: when it sends the request (touches the stop file the old job checks
  every step);
- ``after_save``: once the old job's checkpoint of the change is written.

It lets the new workers build (``DIR/free``) once the old workers' processes are gone, as
scalai's runner frees the devices. The phases come from the workers' marks:

- stop: the request to the save's start (the rest of the step in flight, for a request);
- save: ``dcp.save`` (after waiting for a periodic async save still running), every rank
  done (a barrier);
- relaunch: the save's end to the new workers built (their start-up, the old processes'
  exit and the wait for them overlap here);
- load: ``dcp.load`` + ``set_state_dict`` + the non-tensor state;
- first_step: the first step at B.

On simulated machines (``Settings.machines``, :mod:`.cluster`) each torchrun agent runs in
the namespace of the machine of its slot (its ``--local-addr``, ``GLOO_SOCKET_IFNAME``), the
rendezvous store stays here on the bridge's address, and the checkpoints go to the storage
machine's S3 server (``--storage s3://...``). A killed machine (:func:`killed`): one elastic
torchrun per machine at A with a careful user's settings (:data:`ELASTIC_ENV` and
:func:`_agents`: ``--nnodes N-1:N --max-restarts 3``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, a
process-group timeout of ``Settings.dead_after`` seconds from the first step on, rendezvous
keep-alive every second for as many seconds, ``last_call_timeout=1``); in the middle of step
S every process of the last machine gets SIGKILL; the survivors' step fails (the broken
connection, or the timeout), torchrun restarts its workers with the survivors, which tell
from their world size that they recover, load the newest periodic checkpoint at B and
train on. Its phases: detect (the kill to the first
rank's failed step), relaunch (to the restarted workers built), load, first_step.

The rendezvous store (``--rdzv-endpoint``) lives on the driver's address in the root
namespace, a machine that is never killed, where scalai's coordinator runs too: it is the
single point of failure of torchrun's c10d rendezvous, so a careful user puts it on a host
that outlives the training machines (a login or head node, a Kubernetes service), not on a
training machine that may die.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from .harness import (Case, Outcome, Processes, RunFailed, Scenario, Settings, ahead_due, env_for_runs,
                      mid_step_time, poll_until, read_rows)

__all__ = ["NAME", "ELASTIC_ENV", "agent_env", "phases", "run", "scheduled", "requested", "killed", "tricks"]

NAME = "DCP+torchrun"
WORKER = str(Path(__file__).resolve().parent / "dcp_worker.py")
#: The environment of the elastic torchrun agents (a killed machine). Since torch 2.5 the c10d
#: rendezvous shares one TCPStore, held by the first round's rank-0 agent, with every worker
#: generation (``TORCHELASTIC_USE_AGENT_STORE``), and the workers' keys carry no generation:
#: a restarted worker's gloo set-up read the previous generation's addresses and failed on
#: "connection refused" until torchrun ran out of restarts (3 runs of 3 with 2 devices per
#: machine; the agents' logs showed the same master_addr:master_port in every generation).
#: Torch's opt-out (pytorch/pytorch#135712) gives every rendezvous round a fresh store,
#: hosted by the new generation's rank 0 on a free port.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def agent_env(scenario: Scenario) -> dict[str, str]:
    """What the torchrun agents of ``scenario`` get in their environment besides the run's
    (pure): :data:`ELASTIC_ENV` where torchrun restarts workers (a killed machine); nothing
    where each generation is a torchrun of its own and none restarts."""
    return dict(ELASTIC_ENV) if scenario.trigger == "kill" else {}


def phases() -> tuple[str, ...]:
    return ("detect", "stop", "save", "relaunch", "load", "first_step")


def run(settings: Settings, case: Case, scenario: Scenario, work: Path) -> Outcome:
    """One measured run of ``case`` under ``scenario`` in the scratch directory ``work``
    (on fresh simulated machines if ``settings.machines``)."""
    how = {"schedule": scheduled, "request": requested, "kill": killed}[scenario.trigger]
    if not settings.machines:
        return how(settings, case, scenario, work)
    from .cluster import Cluster

    with Cluster(work, settings.machines, settings.link) as cluster:
        return how(settings, case, scenario, work, cluster)


def scheduled(settings: Settings, case: Case, scenario: Scenario, work: Path, cluster=None) -> Outcome:
    """A change after step S, known to the old job from the start (it stops there)."""
    return _drive(settings, case, scenario, work, None, cluster)


def requested(settings: Settings, case: Case, scenario: Scenario, work: Path, cluster=None) -> Outcome:
    """A request in the middle of step S: the stop file, which the old job checks after
    every step; the new job starts at once if the scenario says so."""
    def trigger(rows: list[dict], at: dict[str, float], start_new: Callable[[], None]) -> None:
        due = mid_step_time(rows, settings.at_step - 1)
        if "request" not in at and due is not None and time.time() >= due:
            (work / "stop").touch()
            at["request"] = time.time()
            if scenario.launch == "at_request":
                start_new()

    return _drive(settings, case, scenario, work, trigger, cluster)


def _agents(settings: Settings, scenario: Scenario, layout: str, role: str, work: Path,
            endpoint: str, cluster=None) -> list[list[str]]:
    """One torchrun agent per host the layout uses (as on real hosts, and as scalai's runner
    starts them: 2 devices on one simulated host, 4 on two), in one c10d rendezvous; slot
    ``i`` on simulated machine ``i`` if there is a ``cluster``. A killed machine: elastic,
    ``--nnodes H-1:H``, up to 3 restarts (see :func:`killed`)."""
    from scalai.config import ParallelConfig

    world = ParallelConfig.parse(layout).world_size
    hosts = -(-world // settings.gpus_per_host)
    args = [WORKER, "--role", role, "--dir", str(work), "--layout", layout, "--steps", str(settings.steps(scenario)),
            "--at-step", str(settings.at_step), "--trigger", scenario.trigger, "--commit-every",
            str(settings.commit_every), "--threads", str(settings.dcp_threads),
            *(["--change-fsync"] if settings.dcp_change_fsync else []), *settings.trainer_flags()]
    conf, nnodes, restarts = "is_host=false", str(hosts), "0"
    if cluster is not None:
        args += ["--storage", storage(work), "--timeout", f"{settings.dead_after:g}"]
    if scenario.trigger == "kill":
        nnodes, restarts = f"{hosts - 1}:{hosts}", "3"
        conf += f",last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt={math.ceil(settings.dead_after)}"
    address = (cluster.machine_address if cluster is not None else lambda slot: f"127.0.0.{10 + slot}")
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node",
             str(world // hosts), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id",
             f"baseline-{role}", "--rdzv-conf", conf, "--local-addr", address(slot),
             "--max-restarts", restarts, "--monitor-interval", "0.1", *args] for slot in range(hosts)]


def storage(work: Path) -> str:
    """Where the baseline's checkpoints go on simulated machines: the storage machine's S3."""
    from .cluster import BUCKET

    return f"s3://{BUCKET}/{work.name}"


class Rendezvous:
    """The c10d rendezvous store both generations' torchrun agents meet in, held by the
    driver as a torchrun user's launcher holds it (``endpoint`` = ``host:port``)."""

    def __init__(self, host: str = "127.0.0.1"):
        from torch.distributed import TCPStore

        self._store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        self.endpoint = f"{host}:{self._store.port}"

    def close(self) -> None:
        self._store = None


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it holds no memory, no device)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _launcher(procs: Processes, cluster, extra_env: dict[str, str] | None = None
              ) -> Callable[[int, list[str], Path, str], object]:
    """``launch(slot, cmd, log, what)``: here, or on simulated machine ``slot`` (its
    interface for gloo, the S3 server's address and keys, and ``extra_env`` in its
    environment)."""
    if cluster is None:
        return lambda slot, cmd, log, what: procs.start(cmd, log, what)

    def launch(slot: int, cmd: list[str], log: Path, what: str):
        env = {**procs.env, "GLOO_SOCKET_IFNAME": cluster.interface(slot), **cluster.s3_env(), **(extra_env or {})}
        return procs.add(cluster.spawn(slot, shlex.join(cmd), log, env), log, f"{what} on machine {slot}")

    return launch


def _drive(settings: Settings, case: Case, scenario: Scenario, work: Path, trigger: Callable | None,
           cluster=None) -> Outcome:
    """Run the old job, start the new one when the scenario allows, free its devices once
    the old workers are gone; returns the measured outcome. ``trigger(rows, at, start_new)``
    is called on every poll: it causes the change (and records ``at["request"]``)."""
    procs = Processes(env_for_runs(work))
    launch = _launcher(procs, cluster)
    at: dict[str, float] = {}  # when the driver did what (wall clock)
    saved, rows_path = work / "saved.json", work / "rows.jsonl"

    def start(role: str, layout: str) -> list:
        return [launch(i, cmd, work / f"{role}-{i}.log", f"torchrun agent {i} at {layout}")
                for i, cmd in enumerate(_agents(settings, scenario, layout, role, work, rdzv.endpoint, cluster))]

    def start_new() -> None:
        if "launched" not in at:
            at["launched"] = time.time()
            start("new", case.new)

    def tick() -> None:
        rows = read_rows(rows_path)
        if trigger is not None:
            trigger(rows, at, start_new)
        if scenario.launch == "ahead" and ahead_due(rows, settings.at_step):
            start_new()
        if saved.exists():
            if scenario.launch == "after_save":
                start_new()
            if "freed" not in at and all(process_gone(p) for p in json.loads((work / "old-pids.json").read_text())):
                (work / "free").touch()
                at["freed"] = time.time()
        if "old_exit" not in at and all(a.poll() is not None for a in old):
            at["old_exit"] = time.time()

    # the c10d store both generations' agents meet in, held here as scalai's runner does
    rdzv = Rendezvous(cluster.address if cluster is not None else "127.0.0.1")
    try:
        old = start("old", case.old)
        poll_until(lambda: "launched" in at and procs.all_done(), procs, settings.timeout, "DCP + torchrun", tick)
        procs.check()
    finally:
        procs.stop()
        rdzv.close()
    if not (work / "new.json").exists():
        raise RunFailed(f"the new torchrun left no marks (see {work}/new-*.log)")
    return _outcome(work, at, (storage(work), cluster.storage_options()) if cluster is not None else None)


def killed(settings: Settings, case: Case, scenario: Scenario, work: Path, cluster) -> Outcome:
    """Every process of the last machine killed in the middle of step S; the survivors'
    torchrun agents restart the job at ``case.new`` from the newest periodic checkpoint.

    The agents run with :data:`ELASTIC_ENV`: without it the restarted workers read their
    peers' addresses of the previous generation from the store torchrun shares across
    generations and failed on "connection refused" until the restarts ran out. One restart
    is what a recovery takes; up to 3 are allowed, as a careful user leaves headroom. A
    survivor whose workers have not failed yet when the other joins the new round restarts
    them for a membership change, which torchrun does not count
    (``TORCHELASTIC_RESTART_COUNT`` stays 0): the workers tell that they recover from their
    world size (:func:`.dcp_worker.recovering`)."""
    procs = Processes(env_for_runs(work))
    launch = _launcher(procs, cluster, agent_env(scenario))
    at: dict[str, float] = {}
    rows_path, victim = work / "rows.jsonl", settings.machines - 1

    def tick() -> None:
        due = mid_step_time(read_rows(rows_path), settings.at_step - 1)
        if "request" not in at and due is not None and time.time() >= due:
            at["request"] = time.time()
            procs.forget([agents[victim]])
            cluster.kill(victim)

    rdzv = Rendezvous(cluster.address)
    try:
        agents = [launch(i, [*cmd, "--layout-after", case.new], work / f"old-{i}.log", f"torchrun agent {i}")
                  for i, cmd in enumerate(_agents(settings, scenario, case.old, "old", work, rdzv.endpoint,
                                                  cluster))]
        poll_until(lambda: "request" in at and procs.all_done(), procs, settings.timeout, "DCP + torchrun", tick)
        procs.check()
    finally:
        procs.stop()
        rdzv.close()
    if not (work / "recovered.json").exists():
        raise RunFailed(f"the restarted workers left no marks (see {work}/old-*.log)")
    return _recovery(work, at["request"], cluster.storage_options())


def _recovery(work: Path, kill: float, options: dict) -> Outcome:
    """The measured recovery from a killed machine (``kill``: when; ``options``: to reach
    the checkpoints)."""
    back = json.loads((work / "recovered.json").read_text())
    rows = read_rows(work / "rows.jsonl")
    failed = [json.loads(f.read_text())["time"] for f in work.glob("failed-*.json")]
    noticed = min(failed) if failed else kill  # no rank's step failed: torchrun noticed first
    n = back["marks"]
    bounds = {"detect": (kill, noticed), "relaunch": (noticed, n["built"]), "load": (n["built"], n["loaded"]),
              "first_step": (n["loaded"], back["first"])}
    phases = {k: max(0.0, b - a) for k, (a, b) in bounds.items()}
    starts = {k: max(0.0, a - kill) for k, (a, _) in bounds.items()}
    done = max((r["step"] for r in rows if r["time"] < kill), default=0)
    source = back["from"].rsplit("/", 1)[-1] or "the first step (no periodic checkpoint was complete)"
    generations = len(read_rows(work / "generations.jsonl"))
    notes = [f"torchrun restarted the survivors at {back['layout']} from {source}: "
             f"{max(0, done - back['step'])} steps lost; generations of workers that formed their group after "
             f"the kill: {generations - 1} (1: a single restart)"]
    if not failed:
        notes.append("no rank's step failed before torchrun stopped the workers")
    marks = {k: n[k] - kill for k in ("start", "joined", "built")}
    return Outcome(back["first"] - kill, phases, starts, {r["step"]: r["loss"] for r in rows}, back["step"], marks,
                   {"persisted": _size(back["from"], options) if back["from"] else 0}, [], notes, steps_lost=max(0, done - back["step"]),
                   new_layout=back["layout"])


def _outcome(work: Path, at: dict[str, float], remote: tuple[str, dict] | None = None) -> Outcome:
    """The measured change; ``remote``: the checkpoints' URL and fsspec options, if not in ``work``."""
    saved, new = json.loads((work / "saved.json").read_text()), json.loads((work / "new.json").read_text())
    rows = read_rows(work / "rows.jsonl")
    end_of = {r["step"]: r["time"] for r in rows}
    s, n = saved["marks"], new["marks"]
    request = at.get("request", end_of[saved["step"]])
    bounds = {"stop": (request, s["save_start"]), "save": (s["save_start"], s["save_end"]),
              "relaunch": (s["save_end"], n["built"]), "load": (n["built"], n["loaded"]),
              "first_step": (n["loaded"], new["first"])}
    phases = {k: max(0.0, b - a) for k, (a, b) in bounds.items()}
    starts = {k: max(0.0, a - request) for k, (a, _) in bounds.items()}  # a rank may start saving before rank 0 logs
    marks = {k: n[k] - request for k in ("start", "joined", "waiting", "devices", "model", "built")}
    marks.update({k: at[k] - request for k in ("launched", "freed", "old_exit") if k in at})
    notes = []
    if s["async_waited"] - s["save_start"] > 0.005:
        notes.append(f"the change's save waited {s['async_waited'] - s['save_start']:.2f} s for a periodic async save")
    url, options = remote or (str(work), {})
    periodic = _listing(f"{url}/periodic", options)
    counted = {"written": _size(f"{url}/change", options),
               "persisted": _size(periodic[-1], options) if periodic else 0}
    return Outcome(new["first"] - request, phases, starts, {r["step"]: r["loss"] for r in rows}, saved["step"],
                   marks, counted, saved["periodic"], notes)


def _size(where: str, options: dict) -> int:
    """Bytes under a directory or a URL (fsspec ``options``: how to reach it)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(where, **options)
    return int(fs.du(root)) if fs.exists(root) else 0


def _listing(where: str, options: dict) -> list[str]:
    """The entries of a directory or a URL, sorted, as URLs or paths like ``where``."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(where, **options)
    if not fs.exists(root):
        return []
    prefix = where[: len(where) - len(root)] if where.endswith(root) else ""
    return sorted(prefix + p for p in fs.ls(root, detail=False))


def tricks(settings: Settings, scenario: Scenario) -> list[str]:
    """What this side does, for the report."""
    k, fsync = settings.commit_every, settings.dcp_change_fsync
    if settings.machines:
        return _machine_tricks(settings, scenario)
    start = {"ahead": "ahead of the change by the same rule as scalai's runner (its start-up estimate over "
                      "the step time), up to waiting for the devices (torch imported, rendezvous done, the model "
                      "parallelized on the meta device)",
             "at_request": "at the request, while the old workers finish their step and save",
             "after_save": "once the old job's checkpoint is written"}[scenario.launch]
    return [
        f"new processes: one torchrun agent per simulated host (c10d rendezvous) start {start}; their "
        "workers build the model once the old workers have exited",
        (f"persisted: every {k} steps dcp.async_save (staged in memory while the step waits, written by a "
         "background thread on its own gloo group, fsynced), waiting for the previous one first" if k else
         "persisted: nothing before the change")
        + "; at the change: dcp.save to disk ("
        + ("fsynced" if fsync else "not fsynced: it only has to outlive the processes, as scalai's stores in "
           "memory do; --dcp-change-fsync adds it")
        + f"), FileSystemWriter thread_count={settings.dcp_threads}",
        "pre-allocated: the new workers build the model and create Adam's moments (get_state_dict) before "
        "dcp.load, which reads the files the save has just written (page cache warm)",
        "bytes counted: written = the change's checkpoint on disk (DCP writes a replicated tensor once), "
        "persisted = one periodic checkpoint",
    ]


def _machine_tricks(settings: Settings, scenario: Scenario) -> list[str]:
    """What this side does on simulated machines."""
    k, t = settings.commit_every, settings.dcp_threads
    storage = (f"the S3 server on the storage machine (its own {settings.link} link), through DCP's fsspec storage "
               f"(FsspecWriter(thread_count={t}) / FsspecReader over s3fs)")
    persisted = (f"every {k} steps dcp.async_save to {storage} (staged in memory while the step waits, written by "
                 "a background thread on its own gloo group), waiting for the previous one first" if k else
                 "nothing before the change")
    if scenario.trigger == "kill":
        return [
            f"one elastic torchrun per machine, in its namespace (--nnodes {settings.machines - 1}:"
            f"{settings.machines} --max-restarts 3, c10d rendezvous on the driver's address in the root namespace "
            "(a machine that is not killed, as scalai's coordinator), "
            f"--rdzv-conf last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt="
            f"{math.ceil(settings.dead_after)}: a dead node is dropped within {math.ceil(settings.dead_after)} s, "
            "a restart does not wait 30 s for more nodes; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each generation "
            "of workers meets in a fresh store, torch's shared one gave restarted workers their predecessors' "
            "addresses); the process group's timeout set to "
            f"{settings.dead_after:g} s (scalai's --dead-after) after the first step, torch's default before "
            "(torchtitan's pattern: a restarted worker may wait long for a peer's load)",
            f"persisted: {persisted}",
            "after the kill: the survivors' step fails (a broken connection, else the timeout), torchrun stops "
            "them and restarts its workers with the survivors once the dead machine's keep-alive has expired "
            "(new processes: Python, torch and the trainer imported again; they know they recover from their "
            "world size, as a user's script derives its layout from WORLD_SIZE); they build the model at B, "
            "dcp.load the newest periodic checkpoint whose "
            ".metadata is on S3 (resharding), train on; the steps since it are run again (steps lost)",
            "the harness's files (marks, rows, failure marks) stay in the benchmark's directory in the root "
            "namespace, visible to every machine: they are the harness, not the system under test",
            "bytes counted: persisted = the periodic checkpoint loaded (on S3)",
        ]
    start = {"ahead": "ahead of the change by the same rule as scalai's runner, up to waiting for the devices",
             "at_request": "at the request, while the old workers finish their step and save",
             "after_save": "once the old job's checkpoint is written"}[scenario.launch]
    return [
        f"new processes: one torchrun agent per machine the layout uses, in that machine's namespace (c10d "
        f"rendezvous on the driver's address in the root namespace) start {start}; their workers build the "
        "model once the old workers have exited",
        f"persisted: {persisted}; at the change: dcp.save to the same S3 server",
        "pre-allocated: the new workers build the model and create Adam's moments before dcp.load, which reads "
        "the change's checkpoint back from S3 over the machines' links",
        "the harness's files (stop file, free file, marks, rows) stay in the benchmark's directory in the root "
        "namespace, visible to every machine: they are the harness, not the system under test",
        "bytes counted: written = the change's checkpoint on S3, persisted = one periodic checkpoint",
    ]
