"""The runner's decisions without processes: requests, stop points, time events, lead steps."""

import time

import pytest

from scalai.elastic.ahead import lead_steps
from scalai.elastic.faults import fire_timed
from scalai.elastic.runner import Runner
from scalai.elastic.schedule import parse_schedule
from scalai.elastic.spec import RunSpec


@pytest.fixture
def runner(tmp_path):
    events = parse_schedule([{"step": 4, "devices": 2}, {"step": 6, "devices": 4}, {"time": 0.0, "redeploy": True},
                             {"step": 8, "fail": 1}])
    return Runner(RunSpec(tuple(events), 10, str(tmp_path / "out"), hosts=4, gpus_per_host=2, devices=2))


def test_requests_are_checked_when_they_arrive(runner):
    with pytest.raises(ValueError, match="already runs tp=1,pp=1,dp=2 on host0; nothing to change"):
        runner.request("devices", 2)
    with pytest.raises(ValueError, match="only 8 healthy devices"):
        runner.request("devices", 9)
    accepted = runner.request("devices", 4)
    assert accepted["hosts"] == ["host0", "host1"] and len(runner.take_requests()) == 1


def test_events_that_change_nothing_are_not_stop_points(runner):
    assert runner._next_stop(0, runner.alloc) == 6  # devices 2 at step 4 is what it runs already
    assert runner._next_stop(6, runner.alloc) == 10


def test_time_events_become_requests(runner):
    runner._t0 = time.time() - 1
    fire_timed(runner)
    (action, value, reason, _), = runner.take_requests()
    assert (action, value, reason) == ("redeploy", True, "redeploy (request)")


def test_lead_steps_cover_the_start_up():
    assert lead_steps([], []) == 21  # 10 s over 0.5 s, plus one
    assert lead_steps([4.0, 6.0, 30.0], [0.0, 1.0, 2.0, 3.0]) == 7


@pytest.mark.parametrize("trigger", ["schedule", "request"])
@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_generation_starts_ahead_only_if_asked(tmp_path, trigger, ahead):
    """A scheduled change near (step 3 of 4) or a request starts the successor at once;
    with ``start_ahead`` off nothing starts before the old workers have saved."""
    from scalai.elastic.ahead import maybe_prelaunch
    from scalai.elastic.runner import Generation

    events = parse_schedule([{"step": 4, "devices": 4}] if trigger == "schedule" else [])
    r = Runner(RunSpec(tuple(events), 10, str(tmp_path / "out"), hosts=2, gpus_per_host=2, devices=2,
                       start_ahead=ahead))
    launched = []
    r._gens = []
    r.launch = lambda alloc, start, **kw: launched.append((alloc.devices, start, kw["activate"])) or "next"
    gen = Generation(0, r.alloc, 4 if trigger == "schedule" else 10, 0, [], 0.0, first_row={"step": 1})
    r.rows = [{"step": s, "time": float(s)} for s in (1, 2, 3)]
    if trigger == "request":
        r.request("devices", 4)
    maybe_prelaunch(r, gen, stopping=trigger == "request")
    assert launched == ([(4, 4 if trigger == "schedule" else 3, False)] if ahead else [])
    assert gen.successor == ("next" if ahead else None)


def test_persister_holds_copies_during_a_reconfiguration(tmp_path):
    import threading
    import time

    from scalai.elastic.persist import Persister

    tried = threading.Event()
    errors: list[str] = []

    def urls():
        tried.set()
        return ["http://127.0.0.1:9"]  # nothing listens: the copy fails, and says so

    p = Persister(urls, "job", tmp_path / "ckpts", on_error=errors.append)
    try:
        p.hold()
        p.submit("v3", 30)
        time.sleep(0.3)
        assert not tried.is_set() and p.in_use() == {"v3"}  # waiting, kept in the stores
        p.hold(False)
        assert tried.wait(10) and p.wait_idle(30)
        assert errors and "v3 (step 30)" in errors[0] and p.latest() is None
    finally:
        p.close()


def test_known_ptc_reuses_a_layout_with_the_same_axes(tmp_path):
    """A PTC reported under tp=2,dp=2 serves tp=4,dp=2 (relaid out: the same axes in use),
    not layouts that drop or add an axis (they wait for their own announcement)."""
    import json
    import types

    from scalai.config import ParallelConfig
    from scalai.elastic.runner import Runner, axes_in_use
    from scalai.layout.dtensor import AxisPlacement, MeshSplit
    from scalai.layout.ptc import PTC
    from scalai.layout.spec import Residence, TensorSpec

    split = MeshSplit((AxisPlacement.replicate("dp"), AxisPlacement.shard("tp", 0)))
    spec = TensorSpec("w", (8, 4), "float32", split, Residence.from_json("first"))
    seen = PTC(ParallelConfig.parse("tp=2,pp=1,dp=2"), [spec], 2)
    events = tmp_path / "events" / "g000"
    events.mkdir(parents=True)
    (events / "ptc.json").write_text(json.dumps(seen.to_json()))
    runner = types.SimpleNamespace(dir=tmp_path)

    def known(text):
        return Runner.known_ptc(runner, ParallelConfig.parse(text))

    assert axes_in_use(ParallelConfig.parse("tp=4,pp=2,dp=2")) == (True, True, False)
    got = known("tp=4,pp=2,dp=2")
    assert got is not None and str(got.config) == "tp=4,pp=2,dp=2"
    assert got.rank_shards(0)[0][1].shape == (2, 4)  # the tp split survives the relayout
    assert known("tp=4,pp=1,dp=1") is None and known("tp=1,pp=1,dp=2") is None
    assert known("tp=2,pp=1,dp=2,zero=1") is None  # FSDP sharding is another axis in use
