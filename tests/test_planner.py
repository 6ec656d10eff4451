"""The planner, checked element by element by simulating ranks in one process."""

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalai.config import Placement
from scalai.errors import PlanError
from scalai.models import model_ptc
from scalai.planner import Deployment, check_coverage, make_plan
from simulate import (cross_host_received, elements_without_a_source, execute, gather, global_arrays,
                      host_lower_bounds, padding_is_zero, scatter)

LAYOUTS = [f"tp={t},pp={p},dp={d}{',zero=1' if z else ''}"
           for t in (1, 2, 4) for p in (1, 2, 4) for d in (1, 2, 4) for z in (False, True)
           if t * p * d <= 16 and not (z and d == 1)]


def _grid(n: int, seed: int) -> list[tuple[str, str]]:
    pairs = [(a, b) for a, b in itertools.product(LAYOUTS, LAYOUTS) if a != b]
    return random.Random(seed).sample(pairs, n)


def _assert_lower_bound(plan, unavailable=()) -> None:
    """What the plan's copies send to each host equals the per-host lower bound computed
    independently (element masks over the PTCs' boxes); the plan's statistics agree."""
    expected = host_lower_bounds(plan.old, plan.new, unavailable)
    assert cross_host_received(plan) == expected
    assert all((c.src_host, c.dst_host) == ((plan.new if c.from_new else plan.old).placement.host(c.src_rank),
                                            plan.new.placement.host(c.dst_rank)) for c in plan.copies)
    assert plan.stats.host_received_bytes == expected
    assert plan.stats.cross_host_bytes == plan.stats.cross_host_lower_bound_bytes == sum(expected.values())


def _check(model, a, b, gpus_per_host=2, seed=0):
    old = Deployment(model_ptc(model, a), Placement(gpus_per_host))
    new = Deployment(model_ptc(model, b), Placement(gpus_per_host))
    glob = global_arrays(old.ptc, seed)
    there = make_plan(old, new)
    new_ranks = execute(there, scatter(old.ptc, glob))
    back = gather(new.ptc, new_ranks)
    assert all(np.array_equal(back[k], glob[k]) for k in glob), f"{a} -> {b} changed a tensor"
    assert padding_is_zero(new.ptc, new_ranks)
    _assert_lower_bound(there)
    # and back again, bit for bit, rank by rank
    again = execute(make_plan(new, old), new_ranks)
    original = scatter(old.ptc, glob)
    for r, (x, y) in enumerate(zip(again, original)):
        assert x.keys() == y.keys()
        for k in x:
            assert np.array_equal(x[k], y[k]), f"round trip {a} -> {b} -> {a} differs on rank {r}: {k}"
    return there


@pytest.mark.parametrize("a, b", _grid(24, seed=1))
def test_gpt_tiny_transitions_round_trip(a, b):
    _check("gpt-tiny", a, b)


@pytest.mark.parametrize("a, b", _grid(24, seed=2))
def test_llama_tiny_transitions_round_trip(a, b):
    _check("llama-tiny", a, b, gpus_per_host=4)


@pytest.mark.parametrize("a, b", [
    ("tp=1,pp=2,dp=2,stages=1+3", "tp=2,pp=2,dp=1,stages=3+1"),
    ("tp=2,pp=4,dp=1,stages=1+1+1+1", "tp=1,pp=3,dp=2,zero=1,stages=2+1+1"),
    ("tp=4,pp=1,dp=2,zero=1", "tp=1,pp=2,dp=3,zero=1,stages=3+1"),
])
def test_uneven_pipeline_stages(a, b):
    _check("llama-tiny", a, b)
    _check("gpt-tiny", a, b, gpus_per_host=1)


def test_single_dimension_changes_on_one_host_move_nothing_across_hosts():
    plan = _check("gpt-tiny", "tp=2,pp=2,dp=2", "tp=2,pp=2,dp=2,zero=1", gpus_per_host=8)
    assert plan.stats.cross_host_bytes == 0
    assert plan.stats.same_host_bytes == plan.stats.total_bytes


def test_unchanged_layout_is_all_same_device():
    ptc = model_ptc("gpt-tiny", "tp=2,pp=2,dp=2,zero=1")
    dep = Deployment(ptc, Placement(2))
    plan = make_plan(dep, dep)
    assert plan.stats.same_device_bytes == plan.stats.total_bytes
    assert all(c.src_rank == c.dst_rank for c in plan.copies)


def test_sources_spread_over_replicas_not_dp_rank_0():
    # 4 replicas on 4 hosts -> 4 new hosts: each new host fetches; loads must spread.
    old = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=4"), Placement(1))
    new = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=4"), Placement(1, ("a", "b", "c", "d")))
    plan = make_plan(old, new)
    sent = plan.stats.host_sent_bytes
    assert len(sent) == 4
    assert max(sent.values()) <= 1.1 * min(sent.values())
    assert plan.stats.cross_host_bytes == plan.stats.total_bytes
    _assert_lower_bound(plan)


def test_a_byte_needed_by_several_ranks_of_a_host_crosses_once():
    old = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"), Placement(1, ("old",)))
    new = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=4"), Placement(4, ("new",)))
    plan = make_plan(old, new)
    state = sum(spec.nbytes for spec in old.ptc.specs)  # global bytes, no padding
    assert cross_host_received(plan) == {"new": state}  # once, not four times
    assert plan.stats.total_bytes == 4 * state
    fanout = [c for c in plan.copies if c.from_new]
    assert fanout and all(not c.crosses_hosts for c in fanout)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.sampled_from([1, 2, 3, 8]),
       st.sampled_from(["gpt-tiny", "llama-tiny"]))
def test_any_plan_covers_every_destination_element_once(a, b, gph, model):
    old = Deployment(model_ptc(model, a), Placement(gph))
    new = Deployment(model_ptc(model, b), Placement(gph))
    plan = make_plan(old, new, validate=False)
    check_coverage(plan)
    _assert_lower_bound(plan)
    assert plan.stats.total_bytes == sum(new.ptc.rank_nbytes(r) for r in range(new.ptc.config.world_size)) \
        - _padding_bytes(new.ptc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.sampled_from([1, 2, 3, 4, 8]),
       st.sampled_from([1, 2, 3, 4, 8]), st.integers(0, 2), st.sets(st.integers(0, 3), max_size=2),
       st.sampled_from(["gpt-tiny", "llama-tiny"]))
def test_cross_host_bytes_equal_an_independent_per_host_lower_bound(a, b, g_old, g_new, shift, lost, model):
    """Random layouts, host sizes, new hosts shifted against the old ones (a partial or
    whole redeployment) and lost old hosts (recovery from replicas): every host receives
    exactly the bytes its new ranks need that no surviving old rank on it holds, and the
    values arrive intact without reading a lost rank."""
    old = Deployment(model_ptc(model, a), Placement(g_old))
    new_ptc = model_ptc(model, b)
    hosts = tuple(f"host{shift + i}" for i in range(-(-new_ptc.config.world_size // g_new)))
    new = Deployment(new_ptc, Placement(g_new, hosts))
    unavailable = {r for r in range(old.ptc.config.world_size) if r // g_old in lost}
    if elements_without_a_source(old, unavailable):
        with pytest.raises(PlanError, match="no replica survives"):
            make_plan(old, new, unavailable=unavailable)
        return
    plan = make_plan(old, new, unavailable=unavailable)
    _assert_lower_bound(plan, unavailable)
    glob = global_arrays(old.ptc)
    ranks = scatter(old.ptc, glob)
    for r in unavailable:  # a lost rank's memory is garbage: reading it would show
        ranks[r] = {n: np.full_like(x, -7) for n, x in ranks[r].items()}
    back = gather(new.ptc, execute(plan, ranks))
    assert all(np.array_equal(back[k], glob[k]) for k in glob)


def _assert_replay_is_faithful(old, new, unavailable=frozenset(), fanout=True) -> int:
    """The plan with templates replayed equals the plan with every tensor decided afresh,
    copy by copy and total by total; returns how many copies were replayed."""
    from scalai.dtypes import itemsize
    from scalai.planner.planner import _Builder

    built = []
    for replay in (True, False):
        builder = _Builder(old, new, fanout=fanout, unavailable=frozenset(unavailable), replay=replay)
        for spec in new.ptc.specs:
            builder.add_tensor(spec.name, itemsize(spec.dtype))
        built.append((builder.copies, builder.stats(), builder.templates))
    (replayed, replayed_stats, templates), (fresh, fresh_stats, _) = built
    assert replayed == fresh
    assert replayed_stats == fresh_stats
    return sum(len(t.copies) for t in templates.values() if t is not None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS), st.sampled_from([1, 2, 3, 8]),
       st.sampled_from([1, 2, 4]), st.sets(st.integers(0, 3), max_size=1), st.booleans(),
       st.sampled_from(["gpt-tiny", "llama-tiny"]))
def test_replayed_tensors_get_the_copies_deciding_them_afresh_would(a, b, g_old, g_new, lost, fanout, model):
    """A tensor whose holdings repeat an earlier tensor's replays that tensor's copies
    (when no decision weighed running totals): the plan, copy by copy and total by total,
    is the one made by deciding every tensor afresh, on one host or many, with lost hosts."""
    old = Deployment(model_ptc(model, a), Placement(g_old))
    new = Deployment(model_ptc(model, b), Placement(g_new))
    unavailable = frozenset(r for r in range(old.ptc.config.world_size) if r // g_old in lost)
    if elements_without_a_source(old, unavailable):
        return
    _assert_replay_is_faithful(old, new, unavailable, fanout)


@pytest.mark.parametrize("a, b, new_hosts", [
    ("tp=2,pp=1,dp=1", "tp=1,pp=1,dp=2", ("host1",)),  # fetched once across hosts, then fanned out
    ("tp=2,pp=2,dp=1", "tp=1,pp=2,dp=2", ("host2", "host3")),  # the same per stage
    ("tp=2,pp=1,dp=2", "tp=1,pp=1,dp=1", None),  # one host: sources on the device, or the least read
    ("tp=1,pp=2,dp=1", "tp=2,pp=1,dp=1", None),
])
def test_replayed_templates_cover_every_kind_of_copy(a, b, new_hosts):
    """Cases where templates hold same-device, same-host, cross-host and fanned-out copies:
    replay stays faithful, and copies are in fact replayed."""
    old = Deployment(model_ptc("gpt-tiny", a), Placement(2))
    new_ptc = model_ptc("gpt-tiny", b)
    new = Deployment(new_ptc, Placement(2, new_hosts) if new_hosts else Placement(2))
    assert _assert_replay_is_faithful(old, new) > 0


def _padding_bytes(ptc) -> int:
    from scalai.dtypes import itemsize

    total = 0
    for r in range(ptc.config.world_size):
        for name, shard in ptc.rank_shards(r):
            total += (int(np.prod(shard.shape)) - shard.covered) * itemsize(ptc.spec(name).dtype)
    return total


def test_coverage_check_catches_a_dropped_copy():
    old = Deployment(model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), Placement(8))
    new = Deployment(model_ptc("gpt-tiny", "tp=1,pp=2,dp=1"), Placement(8))
    plan = make_plan(old, new)
    broken = type(plan)(plan.old, plan.new, plan.copies[1:], plan.stats)
    with pytest.raises(PlanError, match="exactly once"):
        check_coverage(broken)
    doubled = type(plan)(plan.old, plan.new, plan.copies + plan.copies[:1], plan.stats)
    with pytest.raises(PlanError, match="exactly once"):
        check_coverage(doubled)
    # a window moved one row down, past the end of its tensor: as many elements, none twice
    import dataclasses

    from scalai.regions import Region

    shapes = {(r, n): sh.shape for r in range(new.ptc.config.world_size) for n, sh in new.ptc.rank_shards(r)}
    i, c = next((i, c) for i, c in enumerate(plan.copies) if c.dst.view is None and len(c.dst.region.sizes) == 2
                and c.dst.region.offsets[0] > 0 and c.dst.region.ends[0] == shapes[(c.dst_rank, c.tensor)][0])
    box = c.dst.region
    moved = dataclasses.replace(c, dst=dataclasses.replace(c.dst, region=Region(
        (box.offsets[0] + 1,) + box.offsets[1:], box.sizes)))
    shifted = type(plan)(plan.old, plan.new, plan.copies[:i] + (moved,) + plan.copies[i + 1:], plan.stats)
    with pytest.raises(PlanError, match="exactly once"):
        check_coverage(shifted)


def test_planning_hundreds_of_ranks_in_one_process():
    old = Deployment(model_ptc("gpt2-small", "tp=4,pp=4,dp=16"), Placement(8))
    new = Deployment(model_ptc("gpt2-small", "tp=2,pp=6,dp=24,zero=1"), Placement(8))
    assert old.ptc.config.world_size == 256 and new.ptc.config.world_size == 288
    plan = make_plan(old, new)
    s = plan.stats
    _assert_lower_bound(plan)
    assert 0 < s.cross_host_bytes < s.total_bytes
    assert sum(s.host_sent_bytes.values()) == sum(s.host_received_bytes.values()) == s.cross_host_bytes


def test_plans_refuse_different_models():
    old = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"), Placement(8))
    new = Deployment(model_ptc("llama-tiny", "tp=1,pp=1,dp=1"), Placement(8))
    with pytest.raises(PlanError, match="is bfloat16.192, 64. in the old state but bfloat16.128, 64."):
        make_plan(old, new)
    fewer = Deployment(model_ptc("gpt-tiny", "tp=1,pp=1,dp=1", optimizer=False), Placement(8))
    with pytest.raises(PlanError, match="both sides must describe the same model"):
        make_plan(old, fewer)


def test_a_subset_plan_reads_only_the_tensors_the_new_layout_holds():
    """An export of the weights: the new layout leaves the optimizer state out, on purpose."""
    old_ptc = model_ptc("gpt-tiny", "tp=2,pp=2,dp=2,zero=1")
    new_ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1", optimizer=False)
    old, new = Deployment(old_ptc, Placement(8)), Deployment(new_ptc, Placement(8))
    with pytest.raises(PlanError, match="drops"):
        make_plan(old, new)
    plan = make_plan(old, new, subset=True)
    assert {c.tensor for c in plan.copies} == set(new_ptc.names)
    glob = global_arrays(old_ptc)
    got = gather(new_ptc, execute(plan, scatter(old_ptc, glob)))
    assert all(np.array_equal(got[n], glob[n]) for n in new_ptc.names)
