"""What the controller does between two generations: a planned change, a recovery, a
restart of the coordinator. Pure (called by :mod:`.controller` on a state copy).

All three follow the same order, chosen so that the new workers' start-up (process,
rendezvous, building the model) overlaps the transformation of the state:

1. decide the new allocation (:mod:`.allocation`);
2. launch the new generation; its workers describe the job in the new layout (an
   announced PTC) unless the run knows it already (:func:`~.jobstate.known_ptc`);
3. ``target``: once that PTC is known (or the workers went on without announcing, or the
   wait timed out: the source's split rules at the new degrees), transform the state in
   the stores into it (``transform``);
4. ``go``: the workers load the new version; ``load``: the first step in the new layout
   ends the change, which is recorded with its phases once every new rank's report says
   when it loaded (rank 0's row and another machine's report travel separately; after
   :data:`REPORTS_GRACE_S` it is recorded with what arrived).

A planned change transforms the version the workers saved when they stopped. A recovery
transforms the survivors' dump when data-parallel replicas hold every byte of the dead
ranks (no step lost), else the newest committed version whose hosts are alive, else the
persistent copy on disk, else it starts from step 0; it counts the steps lost. A restart
(a coordinator started again) continues from the newest committed version in the stores.
"""

from __future__ import annotations

from ..config import ParallelConfig
from ..layout.ptc import PTC
from .ahead import lead_steps
from .allocation import Allocation, Pool, pick_hosts
from .events import reconfiguration_phases
from .jobstate import Change, Commit, Gen, JobState, Policy, known_ptc
from .messages import (Drop, Fail, Fence, Finish, HoldPersist, Kill, Launch, Persist, RecoverDump, Record, Restore,
                       Resume, Say, Signal, Transform)
from .recovery import consistent_dumps, merged_state, replicas_cover
from .timeline import Reconfiguration

#: How long after the new layout's first step a change waits for the new ranks' load
#: marks before it is recorded without them (seconds).
REPORTS_GRACE_S = 10.0

__all__ = ["REPORTS_GRACE_S", "launch", "next_stop", "record_commit", "retain", "after_failure", "begin_planned", "begin_recovery",
           "begin_restart", "advance_change", "finish_run", "prelaunch", "drop_successor", "due"]


# -- generations ----------------------------------------------------------------------
def due(p: Policy, s: JobState, step: int) -> list:
    """Step events (not failures) due after ``step`` that have not fired."""
    return [e for e in p.schedule if e.step == step and e.index not in s.fired and e.action != "fail"]


def _note(s: JobState, key, text: str, out: list) -> None:
    """Say ``text`` once per ``key`` (events are looked at again at every launch)."""
    if key not in s.noted:
        s.noted |= {key}
        out.append(Say(text))


def next_stop(p: Policy, s: JobState, after: int, alloc: Allocation, out: list) -> int:
    """The step a generation running ``alloc`` from ``after`` stops after: the next step
    event that changes something (others are noted once and are not stop points)."""
    for e in p.schedule:
        if e.step is None or e.index in s.fired or e.action == "fail" or e.step <= after:
            continue
        try:
            new = p.apply(s, alloc, e.action, e.value)
        except ValueError as exc:
            _note(s, e.index, f"event {e.index} ({e.describe()}) cannot be carried out now, skipped: {exc}", out)
            continue
        if new == alloc:
            _note(s, e.index, f"event {e.index} ({e.describe()}) changes nothing for {alloc.describe()}; not a stop",
                  out)
            continue
        return e.step
    return p.steps


def launch(p: Policy, s: JobState, alloc: Allocation, start_step: int, resume: bool, free: bool, now: float,
           out: list, activate: bool = True) -> Gen:
    """A new generation for ``alloc``; the running one (``activate``) or the successor."""
    number = s.next_number
    s.next_number += 1
    until = next_stop(p, s, start_step, alloc, out)
    announce = resume and known_ptc(s.ptcs, alloc.layout) is None
    g = Gen(number, alloc, until, start_step, resume, announce, now, freed=free)
    s.gens[number] = g
    out.append(Launch(number, alloc, until, start_step, resume, announce, free))
    if activate:
        s.current, s.alloc = number, alloc
    else:
        s.successor = number
    return g


def drop_successor(s: JobState, out: list) -> None:
    """Kill the generation started ahead (it waits for devices it will not get)."""
    if s.successor is not None:
        g = s.gens[s.successor]
        g.dropped = True
        out.append(Kill(g.number, reason="not needed"))
        g.kill_sent = True
        for r in range(g.world):
            g.exits.setdefault(r, -9)
        s.successor = None


def prelaunch(p: Policy, s: JobState, g: Gen, now: float, out: list) -> None:
    """Start ``g``'s successor when a change is near: a few steps before a scheduled one
    (the measured start-up over the step time), at once for a requested one."""
    if not p.start_ahead or s.successor is not None or s.change is not None or g.first_step is None \
            or g.last_step is None:
        return
    asked = [(a, v) for a, v, _, _ in s.requests]
    if g.stop_at is not None and asked:
        actions, start = asked, g.last_step
    elif not asked and g.until < p.steps:
        startups = s.startups or (p.startup_s,)
        if g.last_step < g.until - lead_steps(startups, s.recent):
            return
        actions, start = [(e.action, e.value) for e in due(p, s, g.until)], g.until
    else:
        return
    alloc = g.alloc
    try:
        for action, value in actions:
            alloc = p.apply(s, alloc, action, value)
    except ValueError:
        return
    if alloc != g.alloc:
        launch(p, s, alloc, start, resume=True, free=False, now=now, out=out, activate=False)


# -- versions -------------------------------------------------------------------------
def record_commit(p: Policy, s: JobState, version: str | None, step: int, hosts, out: list) -> None:
    """A committed version exists in the stores: persist it, drop what it supersedes."""
    if version is None or version in s.dropped or any(c.version == version for c in s.commits):
        return  # (rank 0 reports all its commits each time: a dropped one must stay dropped)
    s.commits.append(Commit(version, step, tuple(hosts)))
    if p.persist:
        out.append(Persist(version, step))
        s.persist_in_use |= {version}
    retain(s, out)


def retain(s: JobState, out: list) -> None:
    """Drop committed versions older than the newest, unless the persistent copy still
    reads them or a change transforms from them: the newest is where a failure without
    replicas restarts."""
    if not s.commits:
        return
    keep = {s.commits[-1].version} | set(s.persist_in_use)
    if s.change is not None and s.change.source and s.change.phase in ("target", "transform"):
        keep.add(s.change.source)
    for c in s.commits:
        if not c.dropped and c.version not in keep:
            c.dropped = True
            out.append(Drop(c.version))
    s.dropped |= {c.version for c in s.commits if c.dropped}
    s.commits = [c for c in s.commits if not c.dropped]  # (a long run commits thousands of times)


def after_failure(p: Policy, alloc: Allocation, pool: Pool, dead_ranks, dead_hosts, ptcs=()) -> tuple[Allocation, Pool]:
    """The allocation after devices (``dead_ranks``: their workers failed) and hosts died,
    and the pool without their devices.

    The job goes on with its surviving devices; if none survive, with as many devices as
    it had, from healthy hosts (a restart elsewhere). A failed device is not used again.

    Raises:
        ValueError: no healthy device is left.
    """
    for host in dead_hosts:
        pool = pool.fail_host(host)
    for rank in dead_ranks:
        if alloc.host(rank) not in dead_hosts:
            pool = pool.fail_devices(alloc.host(rank))
    lost = set(dead_ranks) | {r for r in range(alloc.devices) if alloc.host(r) in dead_hosts}
    survivors = alloc.devices - len(lost)
    n = min(survivors or alloc.devices, pool.total)
    if n < 1:
        raise ValueError("no healthy device is left to continue on")
    prefer = [h for h in alloc.hosts if h not in pool.dead]
    return Allocation(p.choose_in(ptcs)(n), pick_hosts(pool, n, prefer=prefer), p.gpus_per_host), pool


# -- the three kinds of change ----------------------------------------------------------
def _new_change(p: Policy, s: JobState, kind: str, old: int | None, new: Gen, alloc: Allocation, request: float,
                reason: str, at_step: int, now: float, **kw) -> Change:
    s.next_token += 1
    c = Change(s.next_token, kind, old, new.number, alloc, request, reason, at_step, now,
               now + p.announce_timeout_s, **kw)
    s.change = c
    return c


def begin_planned(p: Policy, s: JobState, old: Gen, saved: dict, now: float, out: list) -> None:
    """The running generation stopped and saved ``saved``: change to what the due events
    and the requests ask for (or restart in the same allocation if none can be met)."""
    s.phase = "reconfiguring"
    out.append(HoldPersist(True))  # no disk copies during the downtime (released after the first step)
    step = saved["step"]
    events = due(p, s, step)
    requests, s.requests = s.requests, ()
    s.fired |= {e.index for e in events}
    alloc, reasons = old.alloc, []
    for action, value, reason in [(e.action, e.value, e.describe().split(" at ")[0]) for e in events] + \
                                 [(a, v, r) for a, v, r, _ in requests]:
        try:
            alloc = p.apply(s, alloc, action, value)
            reasons.append(reason)
        except ValueError as exc:
            out.append(Say(f"{reason}: skipped: {exc}"))
    # A request that came before the generation's first step counts from that step's end:
    # the job could not stop earlier.
    started = old.first_step or now
    times = [max(t, started) for *_, t in requests] + ([s.row_times.get(step, now)] if events else [])
    request = min(times) if times else now
    reason = "; ".join(reasons) or "restart (nothing to change)"
    out.append(Say(f"step {step}: {reason} -> {alloc.describe()}"))
    ahead = s.gens.get(s.successor) if s.successor is not None else None
    if ahead is not None and ahead.alloc == alloc:
        s.successor = None
        s.current, s.alloc, new = ahead.number, alloc, ahead
    else:
        drop_successor(s, out)
        new = launch(p, s, alloc, step, resume=True, free=False, now=now, out=out)
    old.exit_deadline = now + p.grace_s
    _new_change(p, s, "planned", old.number, new, alloc, request, reason, step, now, source=saved["version"],
                saved_bytes=saved.get("bytes", 0))
    out.append(Fence(new.number))  # the old generation's save is committed: it may not write again


def begin_recovery(p: Policy, s: JobState, old: Gen, now: float, out: list) -> None:
    """Every worker of the failed generation ``old`` is gone: decide the surviving
    allocation, launch it, and recover the state once its layout is known."""
    if s.change is not None:  # the failed generation was the new one of a change: abandon it
        c = s.change
        if c.phase == "transform":
            s.abandoned[c.token] = (c.alloc, c.at_step)
        if c.kind == "planned" and c.phase in ("target", "transform"):  # its source is the last commit
            prior = s.gens.get(c.old)
            record_commit(p, s, c.source, c.at_step, prior.alloc.hosts if prior else c.alloc.hosts, out)
        s.change = None
    s.phase = "recovering"
    out.append(HoldPersist(True))
    dead_hosts = sorted({t for kind, t, _ in old.killed if kind == "host"})
    failed = old.failed_ranks(dead_hosts)  # their devices are not used again
    died = sorted(r for r in range(old.world) if "dump_start" not in old.times(r)  # no state to recover from
                  or old.alloc.host(r) in dead_hosts)
    s.stuck = s.stuck + 1 if old.first_step is None else 0
    if s.stuck >= 2:
        s.phase = "failed"
        out.append(Fail(f"generation {old.number} failed without completing a step, twice in a row", old.number))
        return
    try:
        alloc, s.pool = after_failure(p, old.alloc, s.pool, failed, dead_hosts, s.ptcs)
    except ValueError as exc:
        s.phase = "failed"
        out.append(Fail(f"after the failure of generation {old.number}: {exc}", old.number))
        return
    lost = ", ".join([f"host {h}" for h in dead_hosts] + [f"rank {r}" for r in failed])
    causes = [f"the transformation failed ({t})" for kind, t, _ in old.killed if kind == "transform"]
    what = "; ".join(([f"lost {lost}"] if lost else []) + causes) or "lost workers"
    out.append(Say(f"failure after step {s.last_logged}: {what}; continuing on {alloc.describe()}"))
    new = launch(p, s, alloc, s.last_logged, resume=True, free=True, now=now, out=out)
    reason = f"failure of {lost}" if lost else (causes[0] if causes else "failure of workers")
    _new_change(p, s, "recovery", old.number, new, alloc, old.failed_at or now, reason,
                0, now, died=tuple(died), dead_hosts=tuple(dead_hosts), last_logged=s.last_logged)


def begin_restart(p: Policy, s: JobState, e: Resume, out: list) -> None:
    """A coordinator started again: continue from the newest committed version whose
    hosts all came back (the schedule's events up to its step count as done)."""
    alive = set(s.pool.hosts)
    accepts = p.accepts_in(s.ptcs + tuple(x.ptc for x in e.stored if x.ptc))
    usable = sorted((v for v in e.stored if set(v.hosts) <= alive and accepts(v.layout) and v.step <= p.steps),
                    key=lambda v: v.sequence)
    out.append(Fence(s.next_number))
    out.append(HoldPersist(True))
    s.phase = "recovering"
    for v in usable:
        s.commits.append(Commit(v.version, v.step, v.hosts))
        if v.ptc is not None and all(x.config != v.ptc.config for x in s.ptcs):
            s.ptcs = s.ptcs + (v.ptc,)
    found = usable[-1] if usable else None
    step = found.step if found else 0
    if found is not None:
        alloc = start = Allocation(found.layout, found.hosts, p.gpus_per_host)
        source = f"store version {found.version} (step {step})"
    else:
        alloc, start = s.alloc, None  # the starting allocation (or one that fits the machines back)
        source = "nothing committed in the stores: restarted from step 0"
    s.fired |= {ev.index for ev in p.schedule if ev.step is not None and ev.step < step}
    reasons = []
    for ev in due(p, s, step):
        s.fired |= {ev.index}
        try:
            alloc = p.apply(s, alloc, ev.action, ev.value)
            reasons.append(ev.describe().split(" at ")[0])
        except ValueError as exc:
            out.append(Say(f"event {ev.index} ({ev.describe()}) skipped: {exc}"))
    s.last_logged = step
    lost = max(0, e.last_step - step)
    if found is not None and step >= p.steps:  # the workers finished the job while no coordinator ran
        out.append(Say(f"coordinator restarted with {len(e.agents)} agents: the job reached its last step "
                       f"({source})"))
        s.phase = "done"
        if p.persist:
            out.append(Persist(found.version, step))
        out.append(Finish(step, found.version))
        return
    out.append(Say(f"coordinator restarted with {len(e.agents)} agents: continuing from {source}; {lost} steps lost"))
    new = launch(p, s, alloc, step, resume=True, free=True, now=e.now, out=out)
    reason = "; ".join(["coordinator restarted"] + reasons)
    c = _new_change(p, s, "restart", None, new, alloc, e.now, reason, step, e.now,
                    source=found.version if found else None, last_logged=e.last_step, recovered_from="checkpoint",
                    source_text=source, steps_lost=lost)
    if found is None or alloc == start:  # nothing to transform: load it as it is
        c.version, c.plan, c.transform, c.phase = c.source, (e.now, e.now), (e.now, e.now), "go"
        c.t_target = e.now
    retain(s, out)


# -- advancing a change ---------------------------------------------------------------
def _target(p: Policy, s: JobState, c: Change, new: Gen, now: float) -> PTC | ParallelConfig | None:
    """What to transform into: the PTC the run knows for the new layout, else the one
    the new workers announce; the layout itself (the source's split rules at the new
    degrees) when rank 0 went on without announcing, the new workers are gone, or the
    wait timed out; None while waiting."""
    known = known_ptc(s.ptcs, c.alloc.layout)
    if known is not None:
        return known
    if new.announced is not None:
        return new.announced
    rank0 = new.times(0)
    if ({"waiting", "ready"} & set(rank0) and "announced" not in rank0) or now > c.deadline \
            or new.all_exited or new.failed:
        return c.alloc.layout
    return None


def advance_change(p: Policy, s: JobState, now: float, out: list) -> None:
    """Move the change in progress on as far as the facts allow."""
    c = s.change
    if c is None:
        return
    new = s.gens[c.new]
    if c.phase == "target":
        target = _target(p, s, c, new, now)
        if target is None:
            return
        c.t_target = now
        if c.kind == "recovery":
            _recover_from(p, s, c, target, now, out)
        else:
            out.append(Transform(c.token, c.source, c.alloc, target, generation=new.number))
            c.phase = "transform"
    if c.phase == "go":
        out.append(Signal(new.number, "go", c.version))
        out.append(Fence(new.number))  # from now on only the new generation writes
        c.go, c.phase = now, "load"
        # the versions' bookkeeping (copies to disk, drops of what they supersede) after the go;
        # the source (the old workers' save, or the survivors' committed dump) is superseded
        if c.source:
            old = s.gens.get(c.old) if c.old is not None else None
            hosts = [h for h in (old.alloc.hosts if old else c.alloc.hosts) if h not in s.pool.dead]
            record_commit(p, s, c.source, c.at_step, hosts, out)
        if c.version is not None:
            record_commit(p, s, c.version, c.at_step, c.alloc.hosts, out)
    if c.phase == "load" and (new.saved is not None  # (saved without a step: it had none to take)
                              or new.first_step is not None and (len(new.marked("load_end")) == new.world
                                                                 or now > new.first_step + REPORTS_GRACE_S)):
        _complete(p, s, c, new, out)


def _recover_from(p: Policy, s: JobState, c: Change, target, now: float, out: list) -> None:
    """Choose where the state comes from after a failure (see the module docstring)."""
    old = s.gens[c.old]
    dumps, why = consistent_dumps(old.reports)
    dumps = {r: d for r, d in dumps.items() if r not in c.died}
    unavailable = sorted(set(range(old.world)) - set(dumps))
    if dumps and not why and old.ptc is None:
        why = "the failed generation never reported its layout"
    if dumps and not why:
        new_ptc = target if isinstance(target, PTC) else old.ptc.relayout(target)
        why = replicas_cover(old.ptc, old.alloc.placement, new_ptc, c.alloc.placement, unavailable)
    dump_version = p.dump_version(old.number)
    if dumps and not why:
        c.at_step = next(iter(dumps.values()))["step"]
        c.recovered_from, c.source_text = "replicas", f"dumps of {len(dumps)} surviving ranks at step {c.at_step}"
        c.source = dump_version
        out.append(RecoverDump(c.token, dump_version, old.ptc, old.alloc, merged_state(dumps), tuple(unavailable),
                               s.pool.alive, c.alloc, target, c.dead_hosts, generation=c.new,
                               dump_generation=old.number))
        c.phase = "transform"
    else:
        out.append(Say(f"  no recovery from replicas: {why or 'no surviving worker dumped its shards'}"))
        out.append(Drop(dump_version))
        c.recovered_from = "checkpoint"
        alive = s.live_commits()
        if alive:
            commit = alive[-1]
            c.at_step, c.source = commit.step, commit.version
            c.source_text = f"store version {commit.version} (step {commit.step})"
            out.append(Transform(c.token, commit.version, c.alloc, target, generation=c.new))
            c.phase = "transform"
        elif s.persisted is not None:
            c.at_step = s.persisted.step
            c.source_text = f"persistent copy {s.persisted.path} (step {c.at_step})"
            out.append(Restore(c.token, s.persisted.path, c.alloc, generation=c.new))
            c.phase = "transform"
        else:
            c.at_step, c.source_text = 0, "nothing committed yet: restarted from step 0"
            c.version, c.plan, c.transform, c.phase = None, (now, now), (now, now), "go"
    c.steps_lost = max(0, (c.last_logged or 0) - c.at_step)
    out.append(Say(f"  recovered from {c.recovered_from}: {c.source_text}; {c.steps_lost} steps lost"))


def _complete(p: Policy, s: JobState, c: Change, new: Gen, out: list) -> None:
    """The first step in the new layout ended the change: record it."""
    old = s.gens.get(c.old) if c.old is not None else None
    target = c.t_target or c.t_allocate
    runner = {"allocate": (c.t_allocate, c.t_allocate), "announce": (c.t_allocate, target),
              "plan": c.plan or (target, target), "transform": c.transform or (target, target)}
    exited = (old.exited_at if old is not None else None) or c.t_allocate
    durations, starts, downtime = reconfiguration_phases(c.request, old.reports if old else {}, exited, runner,
                                                         new.reports, new.first_step, c.go)
    from_alloc = old.alloc if old is not None else c.alloc
    rec = Reconfiguration(c.at_step, str(from_alloc.layout), str(c.alloc.layout), c.reason, phases=durations,
                          bytes_moved=c.bytes_moved, cross_host_bytes=c.cross_host_bytes,
                          bytes_linked=c.bytes_linked, steps_lost=c.steps_lost,
                          recovered_from=c.recovered_from, starts=starts, measured_downtime=downtime,
                          from_hosts=list(from_alloc.hosts), to_hosts=list(c.alloc.hosts), saved_bytes=c.saved_bytes,
                          source=c.source_text, last_step=c.last_logged)
    out.append(HoldPersist(False))
    out.append(Record(rec))
    out.append(Say(f"  back at step {c.at_step + 1} in {c.alloc.layout} after {downtime:.1f} s down ("
                   + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()) + " s)"))
    s.change, s.phase = None, "running"
    retain(s, out)


def finish_run(p: Policy, s: JobState, g: Gen, now: float, out: list) -> None:
    """Every worker of the running generation exited without an error."""
    saved = g.reports.get(0, {}).get("saved")
    if not saved or saved["step"] < p.steps:
        s.phase = "failed"
        out.append(Fail(f"generation {g.number}'s workers exited at step {g.last_step or g.start_step} without "
                        f"saving the job's last step ({p.steps}); does the script call ElasticWorker.save?",
                        g.number))
        return
    record_commit(p, s, saved["version"], saved["step"], g.alloc.hosts, out)
    for _, _, reason, _ in s.requests:
        out.append(Say(f"{reason}: not carried out, the job reached its last step first"))
    s.requests = ()
    s.phase = "done"
    out.append(HoldPersist(False))
    out.append(Finish(saved["step"], saved["version"]))
