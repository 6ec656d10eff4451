"""A run's spec checks itself, including a dry run of its schedule, before anything starts."""

import pytest

from scalai.elastic.schedule import parse_schedule
from scalai.elastic.spec import RunSpec, dry_run


def _spec(tmp_path, events, **kw):
    kw = {"hosts": 2, "gpus_per_host": 2, "devices": 2, **kw}
    return RunSpec(tuple(parse_schedule(events)), kw.pop("steps", 20), str(tmp_path / "out"), **kw)


def test_dry_run_follows_the_events(tmp_path):
    spec = _spec(tmp_path, [{"step": 3, "devices": 4}, {"step": 6, "fail": 3}, {"step": 9, "layout": "tp=2"}])
    steps = [(e.step, str(a.layout), a.hosts) for e, a in dry_run(spec.policy(2), spec.local_pool())]
    assert steps[0][0] == 3 and steps[0][2] == ("host0", "host1")
    assert steps[1][1] == "tp=1,pp=1,dp=3"
    assert steps[2] == (9, "tp=2,pp=1,dp=1", ("host0",))


@pytest.mark.parametrize("events, kw, fragment", [
    ([{"step": 25, "devices": 2}], {}, "never fires: the run ends at step 20"),
    ([{"step": 2, "devices": 5}], {}, "event 0 .*only 4 healthy devices"),
    ([{"step": 2, "devices": 4}, {"step": 3, "redeploy": True}], {}, "event 1 .*outside the job.s current hosts"),
    ([{"step": 2, "layout": "tp=8"}], {}, "event 0 .*tp=8"),
    ([{"step": 2, "fail": "host7"}], {}, "there is no host host7"),
    ([{"step": 2, "fail": 9}], {}, "rank 9 can never exist"),
    ([], {"devices": 9}, "--devices 9: the machines have 4"),
    ([], {"layout": "tp=2,pp=1,dp=1", "devices": 4}, "uses 2 devices, not --devices 4"),
    ([], {"layout": "pp=2,dp=3", "devices": None}, "pipeline micro-batches must be equal"),
    ([], {"steps": 0}, "--steps=0 must be a positive integer"),
    ([], {"job": "a/b"}, "job"),
])
def test_bad_runs_are_refused_up_front(tmp_path, events, kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        _spec(tmp_path, events, **kw)


def test_failures_of_hosts_the_job_may_not_use_are_kept(tmp_path):
    spec = _spec(tmp_path, [{"step": 5, "fail": "host1"}])  # only a scale request would put it there
    assert [a.hosts for _, a in dry_run(spec.policy(2), spec.local_pool())] == [("host0",)]
