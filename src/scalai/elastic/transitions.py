"""What the runner does between two generations: a planned change, or a recovery.

Both follow the same order, chosen so that the new workers' start-up (Python, torch,
rendezvous, building the model) overlaps the transformation of the state; the runner times
each step as a phase of the reconfiguration (:func:`~.events.reconfiguration_phases`):

1. ``allocate``: decide the new allocation (pure: :mod:`.allocation`) and start the new
   generation's agents (or adopt those started ahead);
2. ``announce``: wait until the new workers have announced the job's PTC under the new
   layout (described on the meta device; nothing to wait for when the run knows it);
3. ``plan`` and ``transform``: plan the transformation into that PTC and the new placement,
   and let the stores carry it out;
4. write the go file naming the new version; the workers load it and train on.

A planned change transforms the version the workers saved when they stopped. A recovery
transforms the survivors' dump (with the dead ranks' bytes read from replicas) when it
covers everything, otherwise the newest committed version (in the stores, else its
persistent copy on disk), and counts the steps lost.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .ahead import drop_successor
from ..config import ParallelConfig
from .allocation import apply_event
from .events import read_generation, write_json_atomic
from .recovery import commit_dump, consistent_dumps, dump_owner, merged_state, replicas_cover, restore_from_disk
from .spec import after_failure
from .timeline import Reconfiguration
from .worker import go_file, layout_file

if TYPE_CHECKING:
    from .runner import Generation, Runner

__all__ = ["Outcome", "reconfigure", "recover", "target_layout"]

#: Longest wait for a new generation's announced layout (its workers' start-up).
ANNOUNCE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """How a generation ended: ``done``, ``stopped`` (saved ``version`` at ``step``) or
    ``failed`` (``request``: when the failure happened; ``logs``: the failed agents' tails)."""

    kind: str
    step: int | None
    version: str | None
    saved_bytes: int
    request: float | None
    logs: str = ""


def target_layout(runner: Runner, gen: Generation, timeout: float = ANNOUNCE_TIMEOUT_S, poll: float = 0.02):
    """What to transform the state into for ``gen``: the PTC the run already knows for its
    layout (:meth:`Runner.known_ptc`), else the one its workers announce
    (:meth:`~.worker.ElasticWorker.announce`), waiting for it while they start; or ``gen``'s
    layout (the old PTC's split rules at the new degrees) when its rank 0 went on without
    announcing (a script that does not), its agents died, or ``timeout`` seconds passed."""
    from ..layout.ptc import PTC

    known = runner.known_ptc(gen.alloc.layout)
    if known is not None:
        return known
    path = layout_file(runner.dir, gen.number)
    deadline = time.time() + timeout
    while True:
        if path.exists():
            try:
                ptc = PTC.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, KeyError) as exc:
                runner.say(f"  warning: generation {gen.number}'s announced layout is unreadable ({exc}); "
                           f"transforming by the old split rules")
                return gen.alloc.layout
            if ptc.config != gen.alloc.layout:
                runner.say(f"  warning: generation {gen.number} announced {ptc.config}, not "
                           f"{gen.alloc.layout}; transforming by the old split rules")
                return gen.alloc.layout
            return ptc
        times = read_generation(runner.dir, gen.number).get(0, {}).get("times", {})
        if {"waiting", "ready"} & set(times) and not path.exists():
            return gen.alloc.layout  # rank 0 went on without announcing
        if time.time() > deadline or any(a.poll() is not None for a in gen.agents):
            return gen.alloc.layout
        time.sleep(poll)


def _transform(runner: Runner, alloc, version: str, lost_hosts=(), layout=None):
    """Transform ``version`` into ``layout`` (a PTC or a configuration; default
    ``alloc.layout``) on ``alloc``'s hosts."""
    from ..store import reshard

    t0 = time.time()
    result = reshard(runner._cluster(), runner.spec.job, layout or alloc.layout,
                     gpus_per_host=runner.spec.gpus_per_host, hosts=list(alloc.hosts), version=version,
                     keep_old=True, lost=list(lost_hosts), replicas="per_host")
    plan_end = t0 + result.phases.get("plan", 0.0)
    return result, (t0, plan_end), (plan_end, time.time())


def _go(runner: Runner, gen: Generation, version: str | None) -> float:
    write_json_atomic(go_file(runner.dir, gen.number), {"version": version})
    return time.time()


def reconfigure(runner: Runner, old: Generation, outcome: Outcome) -> Generation:
    """A planned change after the workers stopped and saved ``outcome.version``."""
    from .runner import _Pending

    runner.state = "reconfiguring"
    t_allocate = time.time()
    if runner.persister is not None:
        runner.persister.hold()  # no disk copies during the downtime (released after the first step)
    due = runner.due(outcome.step)
    requests = runner.take_requests()
    alloc, reasons = old.alloc, []
    for e in due:
        runner._fired.add(e.index)
    for action, value, reason in [(e.action, e.value, e.describe().split(" at ")[0]) for e in due] + \
                                 [(a, v, r) for a, v, r, _ in requests]:
        try:
            alloc = apply_event(alloc, runner.pool, action, value, runner.spec.chooser, runner.spec.accepts)
            reasons.append(reason)
        except ValueError as exc:
            runner.say(f"{reason}: skipped: {exc}")
    # A request that came before the generation's first step counts from that step's end:
    # the job could not stop earlier.
    started = old.first_row["time"] if old.first_row else t_allocate
    request = min([max(t, started) for *_, t in requests] + ([_row_time(runner, outcome.step)] if due else [])
                  or [t_allocate])
    reason = "; ".join(reasons) or "restart (nothing to change)"
    runner.say(f"step {outcome.step}: {reason} -> {alloc.describe()}")
    if old.successor is not None and old.successor.alloc == alloc:
        new = old.successor  # started ahead: its workers wait for the devices
        runner.activate(new)
    else:
        drop_successor(old)
        new = runner.launch(alloc, outcome.step, resume=True, free=False)
    runner.await_exit(old, new)
    t_announce = time.time()
    target = target_layout(runner, new)
    t_plan = time.time()
    result, plan, transform = _transform(runner, alloc, outcome.version, layout=target)
    change = Reconfiguration(outcome.step, str(old.alloc.layout), str(alloc.layout), reason,
                             bytes_moved=result.stats.total_bytes, cross_host_bytes=result.cross_host_bytes,
                             from_hosts=list(old.alloc.hosts), to_hosts=list(alloc.hosts),
                             saved_bytes=outcome.saved_bytes)
    runner._pending = _Pending(change, request, old, {"allocate": (t_allocate, t_announce),
                                                      "announce": (t_announce, t_plan),
                                                      "plan": (t_plan, plan[1]), "transform": transform})
    runner._pending.go = _go(runner, new, result.target)
    # The bookkeeping of versions (it drops the ones these supersede) waits until after the go.
    runner.record_commit(outcome.version, outcome.step, old.alloc.hosts)
    runner.record_commit(result.target, outcome.step, alloc.hosts)
    return new


def _row_time(runner: Runner, step: int) -> float:
    times = [r["time"] for r in runner.rows if r["step"] == step and r.get("time")]
    return times[-1] if times else time.time()


def recover(runner: Runner, old: Generation, outcome: Outcome) -> Generation:
    """After a failure: the survivors' dumps if replicas cover the dead ranks, else the last
    committed version (stores, then disk), else a fresh start."""
    from .runner import _Pending, ptc_of

    from ..store.lease import Lease

    runner.state = "recovering"
    t_allocate = time.time()
    if runner.persister is not None:
        runner.persister.hold()
    world = old.alloc.devices
    reports = read_generation(runner.dir, old.number)
    dead_hosts = [t for kind, t, _ in old.killed if kind == "host"]
    died = sorted(r for r in range(world) if "dump_start" not in reports.get(r, {}).get("times", {})
                  or old.alloc.host(r) in dead_hosts)
    last_logged = max((r["step"] for r in runner.rows), default=0)
    alloc, runner.pool = after_failure(runner.spec, old.alloc, runner.pool, died, dead_hosts)
    what = ", ".join([f"host {h}" for h in dead_hosts] + [f"rank {r}" for r in died
                                                          if old.alloc.host(r) not in dead_hosts])
    runner.say(f"failure after step {last_logged}: lost {what or 'workers'}; continuing on {alloc.describe()}")
    new = runner.launch(alloc, last_logged, resume=True)
    t_announce = time.time()
    target = target_layout(runner, new)
    t_plan = time.time()

    dumps, why = consistent_dumps(reports)
    dumps = {r: d for r, d in dumps.items() if r not in died}
    unavailable = sorted(set(range(world)) - set(dumps))
    old_ptc = None
    if dumps and not why:
        try:
            old_ptc = ptc_of(runner.dir, old.number)
        except OSError:
            why = "the failed generation never reported its layout"
    if old_ptc is not None and not why:
        new_ptc = target if not isinstance(target, ParallelConfig) else old_ptc.relayout(target)
        why = replicas_cover(old_ptc, old.alloc.placement, new_ptc, alloc.placement, unavailable)
    cluster = runner._cluster()
    dump_version = f"rescue-g{old.number:03d}"
    source, step, moved, cross = "", 0, 0, 0
    alive = [h for h in runner.spec.host_names if h not in runner.pool.dead]
    if not why:
        step = next(iter(dumps.values()))["step"]
        with Lease(cluster, runner.spec.job, dump_owner(dump_version)) as lease:
            lease.hold(dump_version, alive)  # the survivors' dump stays until it is committed
            commit_dump(cluster, runner.spec.job, dump_version, old_ptc, old.alloc.placement, merged_state(dumps),
                        unavailable, alive)
        result, plan, transform = _transform(runner, alloc, dump_version, dead_hosts, target)
        version, recovered = result.target, "replicas"
        moved, cross = result.stats.total_bytes, result.cross_host_bytes
        source = f"dumps of {len(dumps)} surviving ranks at step {step}"
    else:
        runner.say(f"  no recovery from replicas: {why}")
        cluster.drop(runner.spec.job, dump_version, owner=dump_owner(dump_version))
        recovered = "checkpoint"
        alive = [c for c in runner.commits if not c["dropped"] and not set(c["hosts"]) & set(runner.pool.dead)]
        persisted = runner.persister.latest() if runner.persister else None
        t0 = time.time()
        if alive:
            c = alive[-1]
            result, plan, transform = _transform(runner, alloc, c["version"], layout=target)
            version, step = result.target, c["step"]
            moved, cross = result.stats.total_bytes, result.cross_host_bytes
            source = f"store version {c['version']} (step {step})"
        elif persisted is not None:
            from ..store import StoreCluster

            targets = StoreCluster([dict(zip(runner.hosts.hosts, runner.hosts.urls))[h] for h in alloc.hosts],
                                   runner.hosts.token)
            version, moved = restore_from_disk(str(persisted.path), alloc.layout, targets, runner.spec.job,
                                               runner.spec.gpus_per_host)
            step, cross = persisted.step, moved
            plan, transform = (t_plan, t0), (t0, time.time())  # the copy on disk resharded and pushed
            source = f"persistent copy {persisted.path} (step {step})"
        else:
            version, step, plan, transform = None, 0, (t_plan, t0), (t0, t0)
            source = "nothing committed yet: restarted from step 0"
    lost = max(0, last_logged - step)
    runner.say(f"  recovered from {recovered}: {source}; {lost} steps lost")
    change = Reconfiguration(step, str(old.alloc.layout), str(alloc.layout),
                             f"failure of {what or 'workers'}", bytes_moved=moved, cross_host_bytes=cross,
                             steps_lost=lost, recovered_from=recovered, from_hosts=list(old.alloc.hosts),
                             to_hosts=list(alloc.hosts), source=source, last_step=last_logged)
    # A failure the runner did not cause is first seen when the survivors start dumping (their
    # agents exit only after that): the downtime counts from the earliest sign of it.
    dump_starts = [r["times"]["dump_start"] for r in reports.values() if "dump_start" in r.get("times", {})]
    request = min([outcome.request or t_allocate, *dump_starts])
    runner._pending = _Pending(change, request, old, {"allocate": (t_allocate, t_announce),
                                                      "announce": (t_announce, t_plan),
                                                      "plan": (t_plan, plan[1]), "transform": transform})
    runner._pending.go = _go(runner, new, version)
    if version is not None:  # the bookkeeping of versions (it drops older ones) waits until after the go
        runner.record_commit(version, step, alloc.hosts)
    return new
