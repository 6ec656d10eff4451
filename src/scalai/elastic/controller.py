"""The elastic runner's decisions: ``step(policy, state, event) -> (state, actions)``. Pure.

Each event only records a fact (a report, an exit, a step, a machine that joined or
died); then :func:`_reconcile` looks at the whole state and decides what follows, the
way a Kubernetes controller reconciles what it wants with what it sees:

- time-triggered schedule events fire; step-triggered failures fire once their step ran;
- a generation that failed (a worker exited with an error or dumped, a machine died, the
  schedule killed something) is told to abort (its survivors dump their shards and exit,
  even from inside a blocked collective), killed after the grace period, and once every
  worker is gone, recovered (:func:`.changes.begin_recovery`);
- a generation whose workers all saved before the last step starts a planned change
  (:func:`.changes.begin_planned`); one that saved the last step and exited finishes the run;
- requests (``scalai scale``, time events, machines joining or leaving) stop the running
  generation after the same step everywhere;
- a change in progress advances: the target layout's PTC known, the transformation
  done, the first step in the new layout (:mod:`.changes`);
- the next generation is started ahead of a scheduled change (:func:`.changes.prelaunch`);
- leaving machines are released once the job holds nothing on them.

The shell (:mod:`.runner`) feeds every event and performs every action in order. The
input state is never changed (the work happens on :meth:`JobState.copy`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .allocation import Pool
from .changes import (advance_change, begin_planned, begin_recovery, begin_restart, drop_successor, finish_run,
                      launch, prelaunch, record_commit, retain)
from .jobstate import Gen, JobState, Policy
from .schedule import scale_to
from .messages import (Action, AgentDead, AgentGone, AgentJoined, AgentLeaving, Announced, CrashHost, Event, HoldDump,
                       Kill,
                       PersistStatus, RankReport, Release, Resume, Say, ScaleRequested, Signal, Start, StepDone,
                       Tick, TransformDone, TransformFailed, WorkerExited)

__all__ = ["step", "initial_state", "check_request", "request_reason"]

def request_reason(action: str, value) -> str:
    """How a ``scalai scale`` request is named in the run's output and timeline."""
    return {"devices": scale_to(value), "layout": f"layout {value}", "redeploy": "redeploy"}[action] + " (request)"
_KEEP_ROWS = 64  # row times kept (the request time of a step event, the step time estimate)


def initial_state(policy: Policy, agents, resume: bool = False) -> JobState:
    """The state before :class:`Start` (or :class:`Resume`): the agents' pool and the
    starting allocation (resuming, one the agents can hold: the stores decide what runs).

    Raises:
        ValueError: the agents' devices cannot run the starting layout.
    """
    pool = _pool(policy, agents)
    try:
        return JobState(pool=pool, alloc=policy.initial(pool))
    except ValueError:
        if not resume:
            raise
    return JobState(pool=pool, alloc=_fallback(policy, pool))


def _fallback(policy: Policy, pool: Pool):
    """An allocation of as many devices as the pool has (a resumed job whose starting
    layout no longer fits its machines)."""
    from .allocation import Allocation, pick_hosts

    for n in range(pool.total, 0, -1):
        try:
            return Allocation(policy.chooser(n), pick_hosts(pool, n), policy.gpus_per_host)
        except ValueError:
            continue
    raise ValueError(f"no layout of the job fits the {pool.total} devices that came back")


def _pool(policy: Policy, agents) -> Pool:
    if not agents:
        raise ValueError("no agent has joined; start 'scalai agent --join ...' on the machines")
    odd = [a.host for a in agents if a.devices != policy.gpus_per_host]
    if odd:
        raise ValueError(f"agent(s) {', '.join(odd)} report another device count than {policy.gpus_per_host}; "
                         f"every machine of a job runs as many devices (scalai agent --devices N)")
    return Pool(tuple(sorted((a.host for a in agents), key=_natural)), policy.gpus_per_host)


def _natural(name: str) -> tuple:
    """``host2`` before ``host10``."""
    import re

    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def check_request(policy: Policy, state: JobState, action: str, value) -> dict:
    """Whether a scale request can be met now (pure); returns what it leads to.

    Raises:
        ValueError: it cannot (too few devices, a layout the trainer refuses), or it
            changes nothing; the message says why.
    """
    if state.phase in ("done", "failed"):
        raise ValueError(f"the job is {state.phase}; nothing to change")
    new = policy.apply(state, state.alloc, action, value)
    if new == state.alloc:
        raise ValueError(f"the job already runs {state.alloc.describe()}; nothing to change")
    return {"action": action, "value": str(value) if action == "layout" else value, "layout": str(new.layout),
            "hosts": list(new.hosts)}


def step(policy: Policy, state: JobState, event: Event) -> tuple[JobState, list[Action]]:
    """The state after ``event`` and the actions to carry out, in order (pure)."""
    s = state.copy()
    out: list[Action] = []
    if s.phase in ("done", "failed") and not isinstance(event, (PersistStatus, Tick)):
        return s, out
    _FACTS[type(event)](policy, s, event, out)
    if s.phase not in ("done", "failed", "starting"):
        _reconcile(policy, s, event.now if hasattr(event, "now") else s.t0, out)
    return s, out


# -- facts ----------------------------------------------------------------------------
def _start(p: Policy, s: JobState, e: Start, out: list) -> None:
    s.t0 = e.now
    s.phase = "running"
    alloc = s.alloc
    for ev in p.schedule:  # step-0 events shape the start
        if ev.step == 0 and ev.action != "fail":
            s.fired |= {ev.index}
            alloc = p.apply(s, alloc, ev.action, ev.value)
    s.alloc = alloc
    g = launch(p, s, alloc, 0, resume=False, free=True, now=e.now, out=out)
    out.append(Say(f"generation {g.number}: {alloc.describe()}, steps 1-{g.until}"))


def _resume(p: Policy, s: JobState, e: Resume, out: list) -> None:
    s.pool = _pool(p, e.agents)
    s.t0 = e.now
    s.phase = "running"
    s.next_number = max(s.next_number, e.last_generation + 1)
    begin_restart(p, s, e, out)


def _tick(p: Policy, s: JobState, e: Tick, out: list) -> None:
    pass


def _joined(p: Policy, s: JobState, e: AgentJoined, out: list) -> None:
    if e.agent.devices != p.gpus_per_host:
        out.append(Say(f"agent {e.agent.host} has {e.agent.devices} devices, the job {p.gpus_per_host} per host; "
                       f"not used (start it with --devices {p.gpus_per_host})"))
        return
    back = e.agent.host in s.pool.hosts
    s.pool = s.pool.join(e.agent.host)
    out.append(Say(f"agent {e.agent.host} {'joined again' if back else 'joined'} ({e.agent.devices} "
                   f"{e.agent.kind} devices); {s.pool.total} healthy devices"))
    if p.grow:
        n = min(s.pool.total, p.max_devices or s.pool.total)
        if n > s.alloc.devices:
            _request(p, s, "devices", n, f"grow into {e.agent.host}", e.now, out)


def _dead(p: Policy, s: JobState, e: AgentDead, out: list) -> None:
    host = e.host
    if host not in s.pool.hosts or host in s.pool.dead:
        return
    s.pool = s.pool.fail_host(host)
    s.releasing -= {host}
    out.append(Say(f"host {host} is gone ({e.why})"))
    _host_lost(s, host, e.now, out)


def _host_lost(s: JobState, host: str, now: float, out: list) -> None:
    """Every generation loses ``host``'s workers; the current one fails, one started ahead
    is dropped."""
    for g in list(s.gens.values()):
        ranks = g.alloc.ranks_on(host)
        if not ranks:
            continue
        for r in ranks:
            g.exits.setdefault(r, -9)
        if g.number == s.current:
            g.killed += (("host", host, now),)
        elif g.number == s.successor:
            drop_successor(s, out)


def _leaving(p: Policy, s: JobState, e: AgentLeaving, out: list) -> None:
    host = e.host
    if host not in s.pool.hosts or host in s.pool.dead:
        out.append(Release(host))
        return
    s.pool = s.pool.leave(host)
    s.releasing |= {host}
    g = s.gen
    if g is not None and host in g.alloc.hosts:
        n = min(g.alloc.devices, s.pool.total)
        if n < 1:
            out.append(Say(f"{host} asks to leave but no other device is left; it stays until the job ends"))
            s.pool = replace(s.pool, leaving=s.pool.leaving - {host})
            return
        _request(p, s, "devices", n, f"{host} leaves", e.now, out)
    else:
        out.append(Say(f"{host} asks to leave; the job does not use it"))


def _gone(p: Policy, s: JobState, e: AgentGone, out: list) -> None:
    if e.host in s.pool.hosts and e.host not in s.pool.dead:
        s.pool = s.pool.fail_host(e.host)
        s.releasing -= {e.host}
        _host_lost(s, e.host, e.now, out)


def _step_done(p: Policy, s: JobState, e: StepDone, out: list) -> None:
    g = s.gens.get(e.generation)
    if g is None:
        return
    s.last_logged = max(s.last_logged, e.step)
    c = s.change
    if c is not None and e.generation != c.new and e.step > (c.last_logged or 0):
        # a step the old workers finished after the change was decided (a row relayed late,
        # e.g. one run while no coordinator was up): it runs again, so it is lost too
        c.last_logged = e.step
        c.steps_lost = max(0, e.step - c.at_step)
    s.row_times[e.step] = e.time
    for old in [k for k in s.row_times if k < e.step - _KEEP_ROWS]:
        del s.row_times[old]
    s.recent = (s.recent + (e.time,))[-6:]
    g.last_step = e.step
    if g.first_step is None:
        g.first_step = e.time
        marks = [g.times(r).get("waiting") for r in range(g.world)]
        if marks and all(marks):
            s.startups = s.startups + (max(marks) - g.launched,)


def _report(p: Policy, s: JobState, e: RankReport, out: list) -> None:
    g = s.gens.get(e.generation)
    if g is not None and 0 <= e.rank < g.world:
        seen = len(g.reports.get(e.rank, {}).get("commit_errors", []))
        g.reports[e.rank] = e.report
        for failed in e.report.get("commit_errors", [])[seen:] if e.rank == 0 else []:
            out.append(Say(f"  warning: generation {g.number}'s commit in the background failed; training goes "
                           f"on from the last commit (a second failure in a row stops it): {failed['error']}"))
        if e.generation == s.current:
            for c in e.report.get("commits", []) if e.rank == 0 else []:
                record_commit(p, s, c["version"], c["step"], g.alloc.hosts, out)


def _announced(p: Policy, s: JobState, e: Announced, out: list) -> None:
    g = s.gens.get(e.generation)
    if g is None or e.ptc.config != g.alloc.layout:
        if g is not None:
            out.append(Say(f"  warning: generation {g.number} described {e.ptc.config}, not {g.alloc.layout}; "
                           f"ignored"))
        return
    if e.ready:
        g.ptc = e.ptc
    else:
        g.announced = e.ptc
    if all(x.config != e.ptc.config for x in s.ptcs):
        s.ptcs = s.ptcs + (e.ptc,)


def _exited(p: Policy, s: JobState, e: WorkerExited, out: list) -> None:
    g = s.gens.get(e.generation)
    if g is not None and 0 <= e.rank < g.world:
        g.exits.setdefault(e.rank, e.code)


def _scale(p: Policy, s: JobState, e: ScaleRequested, out: list) -> None:
    s.requests = s.requests + ((e.action, e.value, e.reason, e.now),)


def _transform_done(p: Policy, s: JobState, e: TransformDone, out: list) -> None:
    c = s.change
    if c is None or c.token != e.token:  # finished after its change was abandoned: keep it anyway
        alloc = _alloc_of_token(s, e.token)
        if alloc is not None and not set(alloc.hosts) & s.pool.dead:
            record_commit(p, s, e.version, s.abandoned.get(e.token, (None, 0))[1], alloc.hosts, out)
        return
    c.version, c.bytes_moved, c.cross_host_bytes = e.version, e.bytes_moved, e.cross_host_bytes
    c.bytes_linked = e.bytes_linked
    c.plan, c.transform = (c.t_target or c.t_allocate, e.plan[1]), e.transform
    c.phase = "go"  # (the new version is recorded after the go: bookkeeping is off the critical path)


def _alloc_of_token(s: JobState, token: int):
    entry = s.abandoned.get(token)
    return entry[0] if entry else None


def _transform_failed(p: Policy, s: JobState, e: TransformFailed, out: list) -> None:
    c = s.change
    if c is None or c.token != e.token:
        return
    out.append(Say(f"  the transformation failed: {e.error}"))
    g = s.gens[c.new]
    if not g.failed:
        g.killed += (("transform", e.error, e.now),)


def _persist(p: Policy, s: JobState, e: PersistStatus, out: list) -> None:
    s.persist_in_use = e.in_use
    if e.latest is not None:
        s.persisted = e.latest
    if s.phase not in ("done", "failed"):
        retain(s, out)


_FACTS: dict[type, Callable] = {
    Start: _start, Resume: _resume, Tick: _tick, AgentJoined: _joined, AgentDead: _dead, AgentLeaving: _leaving,
    AgentGone: _gone, StepDone: _step_done, RankReport: _report, Announced: _announced, WorkerExited: _exited,
    ScaleRequested: _scale, TransformDone: _transform_done, TransformFailed: _transform_failed,
    PersistStatus: _persist,
}


def _request(p: Policy, s: JobState, action: str, value, reason: str, now: float, out: list) -> None:
    """Queue a change the run asks for itself (checked now; skipped with a note if it cannot be met)."""
    try:
        p.apply(s, s.alloc, action, value)
    except ValueError as exc:
        out.append(Say(f"{reason}: skipped: {exc}"))
        return
    s.requests = s.requests + ((action, value, reason, now),)


# -- reconcile ------------------------------------------------------------------------
def _reconcile(p: Policy, s: JobState, now: float, out: list) -> None:
    _fire_timed(p, s, now, out)
    g = s.gen
    if g is not None:
        _fire_step_failures(p, s, g, now, out)
        _detect_failure(p, s, g, now, out)
    _old_generations(p, s, now, out)
    advance_change(p, s, now, out)
    g = s.gen
    if g is not None:
        if g.failed:
            if g.exit_deadline is not None and now > g.exit_deadline and not g.all_exited:
                out.append(Kill(g.number, reason=f"no exit within {p.grace_s:.0f} s of the failure"))
                g.exit_deadline, g.kill_sent = None, True
            if g.all_exited:
                begin_recovery(p, s, g, now, out)
        elif s.change is None and g.saved and g.saved["step"] < p.steps:
            begin_planned(p, s, g, g.saved, now, out)
        elif s.change is None and g.all_exited:
            finish_run(p, s, g, now, out)
    if s.phase in ("done", "failed"):
        return
    advance_change(p, s, now, out)
    g = s.gen
    if g is not None and not g.failed and s.requests and g.stop_at is None:
        g.stop_at = now
        out.append(Signal(g.number, "stop"))
    if g is not None and not g.failed:
        prelaunch(p, s, g, now, out)
    _release(s, out)
    _prune(s)


def _fire_timed(p: Policy, s: JobState, now: float, out: list) -> None:
    for e in p.schedule:
        if e.time is None or e.index in s.fired or now - s.t0 < e.time:
            continue
        s.fired |= {e.index}
        if e.action == "fail":
            if s.gen is not None:
                _fail(s, s.gen, e.value, f"event {e.index}", now, out)
            continue
        try:
            p.apply(s, s.alloc, e.action, e.value)
        except ValueError as exc:
            out.append(Say(f"event {e.index} ({e.describe()}) skipped: {exc}"))
            continue
        reason = request_reason(e.action, e.value)
        s.requests = s.requests + ((e.action, e.value, reason, now),)


def _fire_step_failures(p: Policy, s: JobState, g: Gen, now: float, out: list) -> None:
    done = g.last_step if g.last_step is not None else -1
    for e in p.schedule:
        if e.action != "fail" or e.index in s.fired or e.step is None or done < e.step:
            continue
        s.fired |= {e.index}
        _fail(s, g, e.value, f"event {e.index}", now, out)


def _fail(s: JobState, g: Gen, target, why: str, now: float, out: list) -> None:
    step = s.last_logged
    if isinstance(target, str):
        if target not in g.alloc.hosts:
            out.append(Say(f"{why}: {target} runs no worker of the job; nothing killed"))
            return
        out.append(CrashHost(target, why))
        s.pool = s.pool.fail_host(target)
        s.releasing -= {target}
        out.append(Say(f"{why}: host {target} died (its workers and its store) at step {step}"))
        _host_lost(s, target, now, out)
        return
    if target >= g.world or g.failed:
        out.append(Say(f"{why}: rank {target} is not running in {g.alloc.layout}; nothing killed"))
        return
    out.append(Kill(g.number, (target,), why))
    g.killed += (("rank", target, now),)  # (its SIGKILL is the failure: kill_sent stays as it is)
    out.append(Say(f"{why}: killed the worker of rank {target} ({g.alloc.host(target)}) at step {step}"))


def _detect_failure(p: Policy, s: JobState, g: Gen, now: float, out: list) -> None:
    if g.failed:
        return
    bad = [r for r, code in g.exits.items() if code != 0]
    dumped = g.marked("dump_start")
    if not (g.killed or bad or dumped):
        return
    # A failure the run did not cause is first seen when a survivor starts dumping (its
    # report may come a little later): the downtime counts from the earliest sign.
    g.failed_at = min([g.killed[0][2] if g.killed else now] + [g.times(r)["dump_start"] for r in dumped])
    g.exit_deadline = now + p.grace_s
    alive = tuple(h for h in g.alloc.hosts if h not in s.pool.dead)
    out.append(HoldDump(g.number))  # the survivors' dump must live until the recovery uses it
    if alive and not g.all_exited:
        if g.first_step is None and not g.marked("load_end"):  # nothing of its own to save: stop it now
            g.kill_sent = True
            out.append(Kill(g.number, reason="its generation failed before it held any state"))
        else:  # survivors dump their shards, even from inside a blocked collective, and exit
            out.append(Signal(g.number, "abort", hosts=alive))
    drop_successor(s, out)


def _old_generations(p: Policy, s: JobState, now: float, out: list) -> None:
    """Generations that saved for a change: once their workers are gone, the devices are
    free for the new one; after the grace period they are killed."""
    c = s.change
    for g in list(s.gens.values()):
        if g.number in (s.current, s.successor) or g.dropped:
            continue
        if g.all_exited and g.exited_at is None:
            g.exited_at = now
            bad = sorted({g.alloc.host(r) for r, code in g.exits.items() if code not in (0, -9)})
            if bad and not g.failed:
                out.append(Say(f"warning: generation {g.number}'s workers on {', '.join(bad)} exited with an "
                               f"error after saving"))
        if not g.all_exited and g.exit_deadline is not None and now > g.exit_deadline:
            out.append(Kill(g.number, reason=f"no exit within {p.grace_s:.0f} s of its save"))
            g.exit_deadline, g.kill_sent = None, True
        if c is not None and c.old == g.number and g.all_exited:
            new = s.gens.get(c.new)
            if new is not None and not new.freed:
                new.freed = True
                out.append(Signal(new.number, "free"))


def _release(s: JobState, out: list) -> None:
    """Leaving hosts the job no longer needs may go."""
    if not s.releasing:
        return
    used = set()
    for n in (s.current, s.successor):
        if n is not None:
            used |= set(s.gens[n].alloc.hosts)
    if s.change is not None:
        used |= set(s.gens[s.change.old].alloc.hosts) if s.change.old in s.gens else set()
    live = s.live_commits()
    if live:
        used |= set(live[-1].hosts)
    for h in sorted(s.releasing - used):
        s.releasing -= {h}
        out.append(Release(h))


def _prune(s: JobState) -> None:
    """Forget generations nothing refers to any more (their workers are all gone)."""
    keep = {s.current, s.successor}
    if s.change is not None:
        keep |= {s.change.old, s.change.new}
    for n in [n for n, g in s.gens.items() if n not in keep and g.all_exited]:
        del s.gens[n]

