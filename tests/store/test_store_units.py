"""Pure parts of the store, in one process: names and windows, cutting copies into blocks,
tensor files, the rate limiter, choosing hosts, plans without fan-out."""

from __future__ import annotations

import asyncio
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalai.config import ParallelConfig, Placement
from scalai.models import model_ptc
from scalai.planner import Deployment, make_plan
from scalai.planner.plan import Copy, Window
from scalai.regions import Region
from scalai.store.files import NewTensor, StoreFileError, TensorMeta, TensorUpload, map_tensor, read_meta
from scalai.store.names import (NameError_, check_name, check_rank, check_tensor_name, format_box, parse_box,
                                parse_window, window_query)
from scalai.store.placement import choose_hosts
from scalai.store.ratelimit import TokenBucket
from scalai.storage.blocks import split_window
from simulate import cross_host_received, host_lower_bounds  # tests/ is on the path (store_helpers)


@pytest.mark.parametrize("bad", ["", ".", "..", ".x", "-x", "a/b", "a\\b", "a b", "é", "a" * 129, "a\0"])
def test_names_refused(bad):
    with pytest.raises(NameError_):
        check_name(bad)


def test_names_accepted():
    assert check_name("gpt-3.v1_x") == "gpt-3.v1_x"
    assert check_tensor_name("_extra_state") and check_tensor_name("decoder.layers.0.mlp.linear_fc1.weight")
    for bad in ("..", ".w", "a/b", "x" * 256):
        with pytest.raises(NameError_):
            check_tensor_name(bad)
    assert check_rank("17") == 17 == check_rank(17)
    for bad in ("-1", "1e3", "٣", "", str(1 << 20), None):
        with pytest.raises(NameError_):
            check_rank(bad)


boxes = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=5).map(
    lambda dims: Region(tuple(o for o, _ in dims), tuple(s for _, s in dims)))


@given(boxes)
def test_box_text_round_trip(box):
    assert parse_box(format_box(box)) == box


@given(st.data())
@settings(max_examples=50)
def test_window_query_round_trip(data):
    n = data.draw(st.integers(1, 60))
    lo = data.draw(st.integers(0, n - 1))
    length = data.draw(st.integers(1, n - lo))
    rows = data.draw(st.sampled_from([d for d in range(1, length + 1) if length % d == 0]))
    view = (rows, length // rows)
    r0, c0 = data.draw(st.integers(0, view[0])), data.draw(st.integers(0, view[1]))
    sub = Region((r0, c0), (data.draw(st.integers(0, view[0] - r0)), data.draw(st.integers(0, view[1] - c0))))
    w = Window(Region((lo,), (length,)), view, sub)
    assert parse_window(window_query(w), (n,)) == w
    assert parse_window({}, (n,)) is None


def _copy(src: Window, dst: Window, itemsize: int) -> Copy:
    return Copy("t", 0, 0, src, dst, src.volume * itemsize, "h", "h")


@pytest.mark.parametrize("shape,src_box,dst_off", [((64, 300), ((3, 10), (50, 280)), (0, 5)),
                                                    ((5000,), ((100,), (4000,)), (7,)),
                                                    ((4, 3, 700), ((1, 0, 50), (3, 3, 600)), (0, 0, 0))])
def test_split_window_reassembles(shape, src_box, dst_off):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 1 << 31, shape, dtype=np.uint32)
    box = Region(*src_box)
    dst = np.zeros(tuple(o + s for o, s in zip(dst_off, box.sizes)), np.uint32)
    c = _copy(Window(box), Window(Region(dst_off, box.sizes)), 4)
    parts = split_window(c.src, c.dst, 4, max_bytes=4096)
    assert len(parts) > 1 and all(sw.volume * 4 <= 4096 and sw.shape == dw.shape for sw, dw in parts)
    for sw, dw in parts:
        dw.select(dst)[...] = sw.select(src)
    np.testing.assert_array_equal(c.dst.select(dst), c.src.select(src))
    assert sum(sw.volume for sw, _ in parts) == box.volume


def test_split_window_of_flat_views():
    flat = np.arange(1000, dtype=np.uint32)
    w = Window(Region((100,), (600,)), (20, 30), Region((2, 5), (15, 20)))
    out = np.zeros((15, 20), np.uint32)
    c = _copy(w, Window(Region((0, 0), (15, 20))), 4)
    for sw, dw in split_window(c.src, c.dst, 4, max_bytes=200):
        dw.select(out)[...] = sw.select(flat)
    np.testing.assert_array_equal(out, w.select(flat))


def test_tensor_files(tmp_path):
    data = np.arange(24, dtype=np.uint16).reshape(4, 6)
    up = TensorUpload(str(tmp_path / "r0" / "t"), "bfloat16", (4, 6))
    up.write(data.tobytes()[:10])
    up.write(data.tobytes()[10:])
    meta = up.finish()
    assert meta == TensorMeta("bfloat16", (4, 6), zlib.crc32(data.tobytes())) == read_meta(str(tmp_path / "r0" / "t"))
    np.testing.assert_array_equal(map_tensor(str(tmp_path / "r0" / "t"), meta), data)
    short = TensorUpload(str(tmp_path / "r0" / "u"), "float32", (3,))
    with pytest.raises(ValueError, match="longer"):
        short.write(b"\0" * 16)
    short.write(b"\0" * 8)
    with pytest.raises(ValueError, match="needs 12"):
        short.finish()
    short.abort()
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == ["t"]
    with open(tmp_path / "r0" / "t", "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreFileError, match="truncated"):
        read_meta(str(tmp_path / "r0" / "t"))


def test_new_tensor_checksums(tmp_path):
    a = np.arange(1000, dtype=np.uint32)
    t = NewTensor(str(tmp_path / "a"), TensorMeta("float32", (1000,)))
    t.write(400, a[100:600], zlib.crc32(a[100:600]))  # pieces with CRCs; the rest stays zero
    expected = a.copy()
    expected[:100] = expected[600:] = 0
    assert t.finish().crc32 == zlib.crc32(expected)
    t = NewTensor(str(tmp_path / "b"), TensorMeta("float32", (10, 100)))
    t.mapping()[2:5, 10:20] = 7  # strided writes: read back to checksum
    expected = np.zeros((10, 100), np.uint32)
    expected[2:5, 10:20] = 7
    assert t.finish().crc32 == zlib.crc32(expected) and read_meta(str(tmp_path / "b")).crc32 == zlib.crc32(expected)


def test_token_bucket_limits_rate():
    async def run():
        bucket = TokenBucket(2e6)  # 2 MB/s
        t0 = time.monotonic()
        for _ in range(10):
            await bucket.take(100_000)
        return time.monotonic() - t0
    assert asyncio.run(run()) >= (1e6 - bucket_burst(2e6)) / 2e6 * 0.9


def bucket_burst(rate: float) -> float:
    return TokenBucket(rate).capacity


def test_choose_hosts_keeps_the_hosts_holding_the_data():
    old_ptc = model_ptc("gpt-tiny", "tp=2,pp=2,dp=2,zero=1")
    hosts = ("host0", "host1", "host2", "host3")
    old = Deployment(old_ptc, Placement(2, hosts))
    # dp 2 -> 1 on 2 hosts: one host per pipeline stage, each already holding its stage
    new = old_ptc.relayout(ParallelConfig.parse("tp=2,pp=2,dp=1,zero=1"))
    chosen = choose_hosts(old, new, 2, hosts)
    stage_of = {"host0": 0, "host1": 0, "host2": 1, "host3": 1}
    assert [stage_of[h] for h in chosen] == [0, 1]
    first = make_plan(old, Deployment(new, Placement(2, hosts)))
    best = make_plan(old, Deployment(new, Placement(2, chosen)))
    worst = lambda s: max(s.host_received_bytes.values())  # noqa: E731
    assert worst(best.stats) < worst(first.stats)
    # the same layout on the same hosts stays where it is
    assert choose_hosts(old, old_ptc, 2, hosts) == hosts
    with pytest.raises(ValueError, match="needs 4 hosts"):
        choose_hosts(old, old_ptc, 2, hosts[:3])


def test_plan_without_fanout_reads_every_rank_directly():
    ptc = model_ptc("gpt-tiny", "tp=2,pp=2,dp=2")
    old = Deployment(ptc, Placement(4))
    new = Deployment(ptc.relayout(ParallelConfig.parse("tp=1,pp=2,dp=4")), Placement(4, ("host2", "host3")))
    fan = make_plan(old, new)
    direct = make_plan(old, new, fanout=False)
    assert any(c.from_new for c in fan.copies) and not any(c.from_new for c in direct.copies)
    bound = host_lower_bounds(old, new)  # element masks, independent of the planner
    assert cross_host_received(fan) == bound
    assert sum(bound.values()) < sum(cross_host_received(direct).values())
    assert fan.stats.total_bytes == direct.stats.total_bytes


def test_plan_around_unavailable_ranks():
    from scalai.errors import PlanError

    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=2")
    old = Deployment(ptc, Placement(2, ("host0", "host1")))
    new = Deployment(ptc, Placement(2, ("host0", "host2")))
    plan = make_plan(old, new, unavailable={2, 3})
    assert not any(c.src_rank in (2, 3) for c in plan.copies if not c.from_new)
    assert plan.stats.host_sent_bytes == {"host0": plan.stats.cross_host_bytes}
    zero = Deployment(model_ptc("gpt-tiny", "tp=2,pp=1,dp=2,zero=1"), old.placement)
    with pytest.raises(PlanError, match="no replica survives"):
        make_plan(zero, Deployment(zero.ptc, new.placement), unavailable={2, 3})
