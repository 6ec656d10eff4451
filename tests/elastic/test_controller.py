"""The controller from tables of events, without a process: every schedule action, scale
requests, machines joining, leaving and dying, failures with and without replicas, and a
coordinator started again. Each scenario writes out, by hand, the actions the rules of
:mod:`scalai.elastic.changes` call for."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller_sim import Sim, kinds, only, said
from scalai.config import ParallelConfig
from scalai.elastic import controller
from scalai.elastic.messages import (AgentDead, AgentGone, AgentInfo, AgentJoined, AgentLeaving, PersistedInfo,
                                     PersistStatus, Resume, ScaleRequested, StoredInfo, TransformFailed)


def L(text: str) -> ParallelConfig:
    return ParallelConfig.parse(text)


def test_the_start_applies_step_zero_events_and_stops_at_the_first_change():
    sim = Sim([{"step": 0, "devices": 4}, {"step": 3, "devices": 4}, {"step": 5, "layout": "tp=1,pp=1,dp=2"}])
    actions = sim.start()
    launch, = only(actions, "Launch")
    assert (launch.generation, launch.alloc.layout, launch.alloc.hosts) == (0, L("tp=1,pp=1,dp=4"), ("host0", "host1"))
    assert (launch.until, launch.resume, launch.announce, launch.free) == (5, False, False, True)
    assert "event 1 (scale to 4 devices at step 3) changes nothing" in said(actions)  # not a stop point


@pytest.mark.parametrize("event, layout, hosts", [
    ({"devices": 4}, "tp=1,pp=1,dp=4", ("host0", "host1")),
    ({"layout": "tp=2,pp=1,dp=1"}, "tp=2,pp=1,dp=1", ("host0",)),
    ({"redeploy": True}, "tp=1,pp=1,dp=2", ("host1",)),
])
def test_a_scheduled_change_runs_stop_save_transform_go_and_records_its_phases(event, layout, hosts):
    sim = Sim([{"step": 4, **event}], steps=8)
    sim.start()
    sim.ready(0)
    # the successor is started ahead (no start-up measured yet: at once), waiting for devices
    ahead, = only(sim.steps(0, 1, 1), "Launch")
    assert (ahead.generation, ahead.alloc.layout, ahead.alloc.hosts) == (1, L(layout), hosts)
    assert (ahead.start_step, ahead.until, ahead.resume, ahead.free) == (4, 8, True, False)
    assert ahead.announce == (L(layout).tp > 1)  # dp only: the PTC of tp=1,pp=1,dp=2 relays out exactly
    sim.steps(0, 2, 4)
    actions = sim.save(0, 4, "v1")
    assert kinds(actions) == ["HoldPersist", "Say", "Fence"] + ([] if ahead.announce else ["Transform"])
    assert only(actions, "Fence")[0].generation == 1 and not only(actions, "Launch")  # the successor is used
    if ahead.announce:
        actions = sim.announce(1)
    transform, = only(actions, "Transform")
    assert (transform.source, transform.alloc.layout, transform.alloc.hosts) == ("v1", L(layout), hosts)
    assert transform.target.config == L(layout) and transform.lost == ()
    assert only(sim.exit(0), "Signal")[0].what == "free"  # the devices are free once the old workers are gone
    actions = sim.transformed(transform, "v2")
    go = actions[0]  # first the go, then the versions' bookkeeping
    assert (go.generation, go.what, go.version) == (1, "go", "v2")
    assert [a.version for a in only(actions, "Persist")] == ["v1", "v2"]
    assert not only(actions, "Drop")  # v1 is still being copied to disk
    assert only(sim.feed(PersistStatus, frozenset({"v2"})), "Drop")[0].version == "v1"  # then it is superseded
    sim.marks(1, "ready", "load_start", "load_end")
    actions = sim.steps(1, 5, 5)
    record, = only(actions, "Record")
    c = record.change
    assert (c.at_step, c.from_layout, c.to_layout, c.reason) == (4, "tp=1,pp=1,dp=2", layout,
                                                                 next(iter(sim.policy.schedule)).describe()[:-10])
    assert set(c.phases) >= {"save", "allocate", "announce", "plan", "transform", "relaunch", "load", "first_step"}
    assert c.downtime > 0 and (c.phases["announce"] > 0) == ahead.announce  # waited for the description
    assert (c.bytes_moved, c.cross_host_bytes, c.saved_bytes) == (100, 50, 1000)
    assert kinds(actions)[:2] == ["HoldPersist", "Record"] and sim.state.change is None


def _at_first_new_step():
    """A scheduled dp 2 -> 4 change up to the go; the new ranks' load marks arrive (or
    not) only after rank 0's first row."""
    sim = Sim([{"step": 2, "devices": 4}], steps=6)
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 2)
    transform, = only(sim.save(0, 2, "v1"), "Transform")  # dp only: no description awaited
    sim.exit(0)
    sim.transformed(transform, "v2")
    sim.marks(1, "ready", "load_start")
    return sim


def test_a_change_is_recorded_when_every_new_rank_said_it_loaded_not_at_the_first_row():
    """Rank 0's row and the other machines' reports travel separately (CI saw a change
    recorded without its load phase): the first row alone does not end the change."""
    sim = _at_first_new_step()
    assert not only(sim.steps(1, 3, 3, loaded=False), "Record") and sim.state.change is not None
    assert not only(sim.marks(1, "load_end", ranks=range(sim.world(1) - 1)), "Record")  # one rank still to say
    record, = only(sim.marks(1, "load_end", ranks=[sim.world(1) - 1]), "Record")
    assert {"load", "first_step"} <= set(record.change.phases) and sim.state.change is None


def test_a_change_whose_load_marks_never_come_is_recorded_after_the_grace_without_them():
    from scalai.elastic.changes import REPORTS_GRACE_S

    sim = _at_first_new_step()
    sim.steps(1, 3, 3, loaded=False)
    assert not only(sim.tick(REPORTS_GRACE_S / 2), "Record")
    record, = only(sim.tick(REPORTS_GRACE_S), "Record")
    assert "load" not in record.change.phases and record.change.downtime > 0 and sim.state.change is None


def test_a_scale_request_stops_the_job_at_once_and_starts_the_new_workers_ahead():
    sim = Sim(steps=10)
    sim.start()
    sim.steps(0, 1, 2)
    with pytest.raises(ValueError, match="only 8 healthy devices"):
        controller.check_request(sim.policy, sim.state, "devices", 9)
    with pytest.raises(ValueError, match="already runs tp=1,pp=1,dp=2 on host0; nothing to change"):
        controller.check_request(sim.policy, sim.state, "devices", 2)
    assert controller.check_request(sim.policy, sim.state, "devices", 6)["hosts"] == ["host0", "host1", "host2"]
    actions = sim.feed(ScaleRequested, "devices", 6, "scale to 6 devices (request)")
    stop, = only(actions, "Signal")
    launch, = only(actions, "Launch")
    assert (stop.generation, stop.what) == (0, "stop")
    assert launch.alloc.layout == L("tp=1,pp=1,dp=6") and not launch.free and launch.until == 10
    sim.steps(0, 3, 3)
    actions = sim.save(0, 3, "v1")
    assert "step 3: scale to 6 devices (request) -> tp=1,pp=1,dp=6 on host0, host1, host2" in said(actions)


def test_time_events_become_requests_and_time_failures_kill():
    sim = Sim([{"time": 5.0, "devices": 4}, {"time": 5.0, "fail": 1}, {"time": 9.0, "devices": 99}])
    sim.start()
    sim.steps(0, 1, 1)
    actions = sim.tick(5.0)
    assert [(a.generation, a.what) for a in only(actions, "Signal")] == [(0, "abort")]  # the failure wins
    assert only(actions, "Kill")[0].ranks == (1,)
    assert sim.state.requests[0][:3] == ("devices", 4, "scale to 4 devices (request)")
    assert "event 2 (scale to 99 devices at 9 s) skipped" in said(sim.tick(4.0))


def test_a_killed_worker_with_a_replica_is_recovered_from_the_survivors_dump():
    sim = Sim([{"step": 3, "fail": 1}], steps=8)
    sim.start()
    sim.ready(0)
    actions = sim.steps(0, 1, 3)
    kill, = only(actions, "Kill")
    assert (kill.generation, kill.ranks) == (0, (1,))
    abort, = only(actions, "Signal")
    assert (abort.what, abort.hosts) == ("abort", ("host0",))
    sim.exit(0, [1], code=-9)
    actions = sim.dump(0, [0], 3)
    launch, = only(actions, "Launch")
    # dp=1 drops the data-parallel axis: the new workers describe the job first
    assert launch.alloc.layout == L("tp=1,pp=1,dp=1") and launch.free and launch.announce is True
    assert "failure after step 3: lost rank 1; continuing on tp=1,pp=1,dp=1 on host0" in said(actions)
    assert not only(actions, "RecoverDump")
    actions = sim.announce(1)
    recover, = only(actions, "RecoverDump")
    assert (recover.dump_version, recover.lost_ranks) == ("rescue-g000", (1,))
    assert recover.alloc.layout == L("tp=1,pp=1,dp=1")
    assert recover.state["rng"]["ranks"] == {"0": [0]}
    assert "recovered from replicas: dumps of 1 surviving ranks at step 3; 0 steps lost" in said(actions)
    sim.transformed(recover, "v1")
    record, = only(sim.steps(1, 4, 4), "Record")
    assert (record.change.recovered_from, record.change.steps_lost, record.change.reason) == ("replicas", 0,
                                                                                              "failure of rank 1")
    assert sim.state.pool.capacity("host0") == 1  # the failed device is not used again


def test_without_replicas_the_job_restarts_from_the_last_commit_and_counts_the_steps_lost():
    sim = Sim([{"step": 5, "fail": 1}], steps=8, layout="tp=2,pp=1,dp=1")
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 3)
    actions = sim.report(0, 0, commits=[{"version": "v1", "step": 3, "time": sim.now}])
    assert only(actions, "Persist")[0].version == "v1"
    sim.steps(0, 4, 5)
    sim.exit(0, [1], code=-9)
    assert only(sim.dump(0, [0], 5), "Launch")[0].announce
    actions = sim.announce(1)
    assert "no recovery from replicas: tensor" in said(actions)
    assert only(actions, "Drop")[0].version == "rescue-g000"
    transform, = only(actions, "Transform")
    assert transform.source == "v1" and transform.alloc.layout == L("tp=1,pp=1,dp=1")
    assert "recovered from checkpoint: store version v1 (step 3); 2 steps lost" in said(actions)


def test_a_step_of_the_old_workers_reported_after_the_decision_counts_as_lost():
    """A row of the old generation that arrives after the change was decided (relayed late)
    ran, and runs again in the new generation: the change counts it among the steps lost."""
    sim = Sim([{"step": 5, "fail": 1}], steps=8, layout="tp=2,pp=1,dp=1")
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 3)
    sim.report(0, 0, commits=[{"version": "v1", "step": 3, "time": sim.now}])
    sim.steps(0, 4, 5)
    sim.exit(0, [1], code=-9)
    sim.dump(0, [0], 5)
    transform, = only(sim.announce(1), "Transform")
    sim.steps(0, 6, 6)  # the old generation's step 6, relayed after the decision
    sim.transformed(transform, "v2")
    record, = only(sim.steps(1, 4, 4), "Record")
    assert record.change.steps_lost == 3


def test_a_dropped_version_reported_again_stays_dropped_and_the_newest_commit_is_kept():
    """Rank 0's reports carry every commit it made: one that arrives after a version was
    dropped (and forgotten) must not bring it back as the newest, nor drop the real newest."""
    sim = Sim(steps=12, layout="tp=2,pp=1,dp=1")
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 6)
    v1 = {"version": "v1", "step": 3, "time": sim.now}
    sim.report(0, 0, commits=[v1])
    sim.report(0, 0, commits=[v1, {"version": "v2", "step": 6, "time": sim.now}])
    actions = sim.feed(PersistStatus, frozenset())  # both copied to disk: v1 is superseded
    assert [d.version for d in only(actions, "Drop")] == ["v1"]
    again = sim.report(0, 0, marks=("step",))  # the same commits, reported once more
    assert only(again, "Drop") == [] and only(again, "Persist") == []
    assert [c.version for c in sim.state.commits] == ["v2"]
    assert only(sim.feed(PersistStatus, frozenset()), "Drop") == []


def test_without_a_live_commit_the_persistent_copy_or_step_zero():
    sim = Sim([{"step": 2, "fail": "host0"}], steps=8, layout="tp=2,pp=1,dp=1")
    sim.start()
    sim.ready(0)
    sim.feed(PersistStatus, frozenset(), PersistedInfo("v0", 1, "/out/checkpoints/step-000001"))
    actions = sim.steps(0, 1, 2)
    assert only(actions, "CrashHost")[0].host == "host0" and "host0" in sim.state.pool.dead
    assert not only(actions, "Signal")  # no survivor to abort
    actions = sim.announce(1)
    restore, = only(actions, "Restore")
    assert restore.path == "/out/checkpoints/step-000001" and restore.alloc.hosts == ("host1",)
    assert "1 steps lost" in said(actions)
    bare = Sim([{"step": 2, "fail": 0}], steps=8, layout="tp=2,pp=1,dp=1")
    bare.start()
    bare.steps(0, 1, 2)
    bare.exit(0, [0], code=-9)
    bare.exit(0, [1], code=1)
    actions = bare.announce(1)
    go, = only(actions, "Signal")
    assert (go.what, go.version) == ("go", None) and "restarted from step 0; 2 steps lost" in said(actions)


def test_a_machine_that_stops_answering_fails_its_generation_and_its_peers_are_aborted():
    sim = Sim(steps=8, devices=4)
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 2)
    actions = sim.feed(AgentDead, "host1")
    abort, = only(actions, "Signal")
    assert (abort.what, abort.hosts) == ("abort", ("host0",))
    assert only(actions, "HoldDump")[0].generation == 0  # its lease held until the dump is used
    assert sim.state.gens[0].exits == {2: -9, 3: -9}
    actions = sim.dump(0, [0, 1], 2)
    launch, = only(actions, "Launch")
    assert launch.alloc.layout == L("tp=1,pp=1,dp=2") and launch.alloc.hosts == ("host0",)
    recover, = only(actions, "RecoverDump")
    assert recover.lost == ("host1",) and (recover.generation, recover.dump_generation) == (1, 0)
    assert not only(actions, "Fence")  # the survivors' dump (generation 0's) is still to be committed
    actions = sim.transformed(recover, "v1")
    go, = only(actions, "Signal")
    assert go.what == "go" and only(actions, "Fence")[0].generation == 1  # generation 0 may no longer write
    idle = sim.feed(AgentDead, "host3")  # not used by the job: the pool shrinks, nothing else
    assert kinds(idle) == ["Say"] and "host3" in sim.state.pool.dead


def test_survivors_that_do_not_exit_are_killed_after_the_grace_period():
    sim = Sim(steps=8, grace_s=30.0)
    sim.start()
    sim.steps(0, 1, 1)
    sim.exit(0, [1], code=1)
    assert not only(sim.tick(10.0), "Kill")
    kill, = only(sim.tick(25.0), "Kill")
    assert kill.generation == 0 and kill.ranks is None
    assert only(sim.exit(0, [0], code=-9), "Launch")  # then the recovery


def test_an_agent_that_joins_is_grown_into_and_one_that_leaves_is_released_after_its_bytes_moved():
    sim = Sim(steps=20, hosts=2, grow=True)
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 2)
    actions = sim.feed(AgentJoined, AgentInfo("host7", 2))
    assert "agent host7 joined" in said(actions)
    assert sim.state.requests[0][:3] == ("devices", 6, "grow into host7")
    assert only(actions, "Signal")[0].what == "stop"
    sim.steps(0, 3, 3)
    actions = sim.save(0, 3, "v1")
    assert "-> tp=1,pp=1,dp=6 on host0, host1, host7" in said(actions)
    transform, = only(actions, "Transform")  # dp=2's PTC relays out to dp=6: no announcement needed
    sim.exit(0)
    sim.transformed(transform, "v2")
    sim.steps(1, 4, 5)
    # host1 leaves: the job moves off it (a planned shrink); it is released after the change
    actions = sim.feed(AgentLeaving, "host1")
    assert not only(actions, "Release") and sim.state.requests[0][2] == "host1 leaves"
    sim.steps(1, 6, 6)
    actions = sim.save(1, 6, "v3")
    assert "host1 leaves -> tp=1,pp=1,dp=4 on host0, host7" in said(actions)
    transform, = only(actions, "Transform")
    assert transform.source == "v3"  # read from host1's store, among others
    sim.exit(1)
    assert not only(sim.transformed(transform, "v4"), "Release")  # until the new layout's first step
    actions = sim.steps(2, 7, 7)
    assert only(actions, "Record") and only(actions, "Release")[0].host == "host1"
    actions = sim.feed(AgentLeaving, "host9")
    assert only(actions, "Release")[0].host == "host9"  # not a host of the job: it may go at once
    assert kinds(sim.feed(AgentGone, "host1")) == []


def test_the_run_finishes_after_the_last_save_and_mentions_requests_left_over():
    sim = Sim(steps=3)
    sim.start()
    sim.steps(0, 1, 3)
    sim.feed(ScaleRequested, "devices", 4, "scale to 4 devices (request)")
    sim.save(0, 3, "v1")
    actions = sim.exit(0)
    assert kinds(actions)[-1] == "Finish" and only(actions, "Finish")[0].version == "v1"
    assert "not carried out, the job reached its last step first" in said(actions)
    assert sim.state.phase == "done" and sim.feed(AgentDead, "host0") == []


def test_workers_that_exit_without_saving_fail_the_run():
    sim = Sim(steps=3)
    sim.start()
    sim.steps(0, 1, 3)
    fail, = only(sim.exit(0), "Fail")
    assert "without saving the job's last step (3)" in fail.message and sim.state.phase == "failed"


def test_two_failures_in_a_row_without_a_step_stop_the_run():
    sim = Sim(steps=8)
    sim.start()
    sim.exit(0, code=1)
    assert only(sim.history[-1][1], "Launch")
    sim.exit(1, code=1)
    assert "failed without completing a step, twice in a row" in only(sim.history[-1][1], "Fail")[0].message


def _transforming():
    """A job growing to 4 devices at step 2: saved as v1, its old workers gone, the
    transformation under way (the Sim and its Transform action)."""
    sim = Sim([{"step": 2, "devices": 4}], steps=8)
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 2)
    transform, = only(sim.save(0, 2, "v1"), "Transform")
    sim.exit(0)
    return sim, transform


def test_a_failed_transformation_fails_the_new_generation_and_recovers_from_the_commit():
    sim, transform = _transforming()
    actions = sim.feed(TransformFailed, transform.token, "store host1 is unreachable")
    kill, = only(actions, "Kill")  # its workers hold nothing yet: stopped at once, not asked to dump
    assert kill.generation == 1 and kill.ranks is None and not only(actions, "Signal")
    actions = sim.exit(1, code=-9)
    assert only(actions, "Launch")[0].alloc.layout == L("tp=1,pp=1,dp=4")  # no device is to blame
    assert sim.state.pool.total == 8
    retry, = only(actions, "Transform")
    assert retry.source == "v1" and "0 steps lost" in said(actions)
    assert "failure after step 2: the transformation failed (store host1 is unreachable)" in said(actions)


def test_a_coordinator_started_again_continues_from_the_newest_version_on_live_hosts():
    sim = Sim([{"step": 2, "devices": 4}, {"step": 6, "devices": 2}], steps=10)
    stored = (StoredInfo("v3", 4, L("tp=1,pp=1,dp=4"), ("host0", "host1"), 3),
              StoredInfo("v4", 5, L("tp=1,pp=1,dp=4"), ("host0", "host9"), 4),  # host9 did not come back
              StoredInfo("v1", 2, L("tp=1,pp=1,dp=2"), ("host0",), 1))
    actions = sim.feed(Resume, sim.agents, stored, 5, 7)
    assert kinds(actions)[:2] == ["Fence", "HoldPersist"] and actions[0].generation == 8
    launch, = only(actions, "Launch")
    assert (launch.generation, launch.alloc.layout, launch.start_step, launch.until) == (8, L("tp=1,pp=1,dp=4"), 4, 6)
    go, = only(actions, "Signal")
    assert (go.what, go.version) == ("go", "v3")  # the same layout and hosts: nothing to transform
    assert "continuing from store version v3 (step 4); 1 steps lost" in said(actions)
    assert [d.version for d in only(actions, "Drop")] == ["v1"]
    record, = only(sim.steps(8, 5, 5), "Record")
    assert (record.change.reason, record.change.steps_lost, record.change.recovered_from) == (
        "coordinator restarted", 1, "checkpoint")
    moved = Sim([{"step": 4, "devices": 2}], steps=10)
    with_ptc = replace(stored[0], ptc=moved.ptc(None, "tp=1,pp=1,dp=4"))  # the manifest's description
    actions = moved.feed(Resume, moved.agents, (with_ptc,), 4, 2)
    transform, = only(actions, "Transform")  # the event at the version's step is carried out now
    assert transform.source == "v3" and transform.alloc.layout == L("tp=1,pp=1,dp=2")
    assert transform.target.config == L("tp=1,pp=1,dp=2")  # the stored PTC relaid out: no wait


def test_a_successor_started_ahead_is_dropped_when_a_failure_comes_first():
    sim = Sim([{"step": 6, "devices": 4}], steps=10)
    sim.start()
    launch, = only(sim.steps(0, 1, 1), "Launch")
    actions = sim.feed(AgentDead, "host1")  # host1 was to join the job at step 6
    assert only(actions, "Kill")[0].generation == launch.generation
    again, = only(actions, "Launch")  # started again, on healthy hosts
    assert again.alloc.hosts == ("host0", "host2") and sim.state.successor == again.generation


def test_the_announced_ptc_is_awaited_then_the_layout_rules_after_a_timeout():
    sim = Sim([{"step": 1, "layout": "tp=2,pp=1,dp=1"}], steps=4, announce_timeout_s=20.0)
    sim.start()
    sim.steps(0, 1, 1)
    assert not only(sim.save(0, 1, "v1"), "Transform")
    assert not only(sim.tick(5.0), "Transform")
    transform, = only(sim.tick(20.0), "Transform")
    assert transform.target == L("tp=2,pp=1,dp=1")
    early = Sim([{"step": 1, "layout": "tp=2,pp=1,dp=1"}], steps=4)
    early.start()
    early.steps(0, 1, 1)
    early.save(0, 1, "v1")
    transform, = only(early.marks(1, "waiting"), "Transform")  # rank 0 went on without announcing
    assert transform.target == L("tp=2,pp=1,dp=1")


def test_a_transformation_finished_after_its_change_was_abandoned_is_kept_as_a_commit():
    sim, transform = _transforming()
    sim.feed(AgentDead, "host1")
    sim.exit(1, [0, 1], code=-9)
    late = sim.transformed(transform, "v2")
    assert only(late, "Drop") == [] and [c.version for c in sim.state.commits][-1] != "v2"  # on a dead host


def test_a_step_never_changes_the_state_it_was_given():
    sim = Sim([{"step": 1, "devices": 4}], steps=4)
    sim.start()
    sim.steps(0, 1, 1)
    before = sim.state
    snapshot = (dict(before.gens[0].reports), dict(before.gens[0].exits), before.requests, list(before.commits))
    controller.step(sim.policy, before, sim.history[0][0].__class__(sim.now, sim.agents))
    sim.save(0, 1, "v1")
    assert (dict(before.gens[0].reports), dict(before.gens[0].exits), before.requests, list(before.commits)) == snapshot


def test_without_start_ahead_the_next_generation_waits_for_the_save():
    sim = Sim([{"step": 2, "devices": 4}], steps=6, start_ahead=False)
    sim.start()
    sim.ready(0)
    assert not only(sim.steps(0, 1, 2), "Launch")
    launch, = only(sim.save(0, 2, "v1"), "Launch")
    assert launch.alloc.layout == L("tp=1,pp=1,dp=4") and not launch.free


def test_a_background_commit_reported_with_the_stop_save_is_recorded_then_superseded_and_failures_are_said_once():
    """Background commits (scalai.elastic.commits): rank 0's report that carries the stop
    save also carries the periodic commit the stop save finished first; both are recorded
    (the periodic one first) and the periodic one is dropped once the stop save's version
    has superseded it. A failed commit in the report is printed once, not at every report."""
    sim = Sim([{"step": 4, "layout": "tp=1,pp=1,dp=2"}], steps=8)
    sim.start()
    sim.ready(0)
    sim.steps(0, 1, 4)
    error = {"time": sim.now, "error": "save of step 2: commit failed on rank 1 - OSError: disk full"}
    assert said(sim.report(0, 0, commit_errors=[error])).count("commit in the background failed") == 1
    assert "commit in the background failed" not in said(sim.report(0, 0, marks=("step",)))
    for r in (1, 0):  # rank 0 last, with the periodic commit of step 3 and the stop save of step 4
        extra = {"saved": {"version": "v2", "step": 4, "bytes": 10},
                 "commits": [{"version": "v1", "step": 3, "time": sim.now}]} if r == 0 else {}
        actions = sim.report(0, r, marks=("save_start", "save_end"), **extra)
    assert [p.version for p in only(actions, "Persist")] == ["v1"] and only(actions, "Transform")[0].source == "v2"
    sim.exit(0)
    sim.feed(PersistStatus, frozenset())
    actions = sim.transformed(only(actions, "Transform")[0], "v3")
    assert [c.version for c in sim.state.commits][-1] == "v3" and "v1" in sim.state.dropped
