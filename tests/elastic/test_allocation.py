"""Allocation decisions (pure): hosts for N devices, layouts, events, failures."""

import pytest

from scalai.config import ParallelConfig
from scalai.elastic.allocation import Allocation, Pool, apply_event, choose_layout, pick_hosts
from scalai.elastic.layouts import LayoutEstimate
from scalai.elastic.changes import after_failure
from scalai.elastic.spec import RunSpec

HOSTS = ("host0", "host1", "host2", "host3")


def test_pick_hosts_whole_hosts_then_the_rest():
    pool = Pool(HOSTS, 2)
    assert pick_hosts(pool, 2) == ("host0",)
    assert pick_hosts(pool, 3) == ("host0", "host1")
    assert pick_hosts(pool, 4, prefer=("host2", "host3")) == ("host2", "host3")
    assert pick_hosts(pool, 4, exclude=("host0", "host1")) == ("host2", "host3")  # a redeployment
    # a partly failed host can only be the last one of a placement
    pool = pool.fail_devices("host0")
    assert pool.capacity("host0") == 1 and pool.total == 7
    assert pick_hosts(pool, 3, prefer=("host0", "host1")) == ("host1", "host0")
    assert pick_hosts(pool, 2, prefer=("host0",)) == ("host1",)
    assert pick_hosts(pool.fail_host("host1"), 1, prefer=("host1", "host0")) == ("host0",)


def test_pick_hosts_says_what_is_missing():
    pool = Pool(("host0", "host1"), 2).fail_host("host1")
    with pytest.raises(ValueError, match="only 2 healthy devices are left"):
        pick_hosts(pool, 3)
    with pytest.raises(ValueError, match="outside the job's current hosts"):
        pick_hosts(Pool(("host0", "host1"), 2), 4, exclude=("host0",))


def _estimate(text, seconds, fits=True):
    return LayoutEstimate(ParallelConfig.parse(text), 1.0, fits, seconds)


def test_choose_layout_keeps_replicas_when_they_cost_nothing():
    ranking = [_estimate("tp=1,pp=1,dp=2,zero=1", 1e-3), _estimate("tp=1,pp=1,dp=2", 1e-3),
               _estimate("tp=2,pp=1,dp=1", 2e-3)]
    assert choose_layout(ranking, 2) == ParallelConfig(dp=2)
    slower = [_estimate("tp=1,pp=1,dp=2,zero=1", 1e-3), _estimate("tp=1,pp=1,dp=2", 5e-3)]
    assert choose_layout(slower, 2) == ParallelConfig(dp=2, zero=True)
    with pytest.raises(ValueError, match="no layout of the model fits 2 devices"):
        choose_layout([_estimate("tp=2,pp=1,dp=1", 1.0, fits=False)], 2)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return RunSpec((), 20, str(tmp_path_factory.mktemp("run") / "out"), hosts=4, gpus_per_host=2, devices=2)


@pytest.fixture(scope="module")
def policy(spec):
    return spec.policy(2)


def test_the_chooser_ranks_trainable_layouts_only(policy):
    from scalai.examples.gpt.plugin import trainer_shape

    assert trainer_shape("gpt-tiny").num_heads == 4
    for n in (1, 2, 3, 4):
        layout = policy.chooser(n)
        assert layout.world_size == n and policy.accepts(layout)
    assert policy.chooser(3) == ParallelConfig(dp=3)  # tp and pp must divide 4 heads and 4 layers


def test_events_change_the_allocation(spec, policy):
    start, pool = spec.initial(), spec.local_pool()
    assert start == Allocation(ParallelConfig(dp=2), ("host0",), 2)
    grown = apply_event(start, pool, "devices", 4, policy.chooser, policy.accepts)
    assert grown.devices == 4 and grown.hosts == ("host0", "host1")
    moved = apply_event(grown, pool, "redeploy", True, policy.chooser, policy.accepts)
    assert moved.layout == grown.layout and moved.hosts == ("host2", "host3")
    tp = apply_event(start, pool, "layout", ParallelConfig(tp=2, dp=2), policy.chooser, policy.accepts)
    assert tp.hosts == ("host0", "host1")
    with pytest.raises(ValueError, match="cannot run layout tp=3"):
        apply_event(start, pool, "layout", ParallelConfig(tp=3), policy.chooser, policy.accepts)


def test_after_a_failure_the_job_goes_on_with_its_survivors(spec, policy):
    alloc = Allocation(ParallelConfig(pp=2, dp=2), ("host2", "host3"), 2)
    new, pool = after_failure(policy, alloc, spec.local_pool(), [3], [])
    assert new.devices == 3 and new.hosts == ("host2", "host3") and pool.capacity("host3") == 1
    # a whole host dies: its ranks are gone
    new, pool = after_failure(policy, alloc, spec.local_pool(), [], ["host3"])
    assert new == Allocation(policy.chooser(2), ("host2",), 2) and "host3" in pool.dead
    # nothing survives: as many devices as before, elsewhere
    single = Allocation(ParallelConfig(tp=2), ("host0",), 2)
    new, pool = after_failure(policy, single, spec.local_pool(), [], ["host0"])
    assert new.devices == 2 and new.hosts == ("host1",)
