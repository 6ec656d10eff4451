"""The plan runner: hand-made plans, make_plan plans, files and in-memory sources and sinks."""

import os
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scalai.checkpoint.writer as writer_module
from scalai.checkpoint import Checkpoint, CheckpointWriter, save_arrays, verify
from scalai.config import ParallelConfig, Placement
from scalai.dtypes import raw_numpy
from scalai.errors import PlanError
from scalai.reshard import Reshard, ReshardTime, reshard_checkpoint
from scalai.layout.ptc import PTC
from scalai.layout.spec import TensorSpec, with_optimizer_state
from scalai.layout.splits import Replicate, Split
from scalai.models import model_ptc
from scalai.planner import Copy, Deployment, Plan, PlanStats, Window, make_plan
from scalai.regions import Region, flat_runs
from scalai.locations import create_sink, open_source
from scalai.planner import identity_plan
from scalai.storage import ArraysSink, ArraysSource, run_plan
from scalai.storage.memory import delete_memory_checkpoint, memory_checkpoints
from scalai.storage.verify import verify_source
from scalai.storage import blocks as transfer
from scalai.storage.filler import Clock, Filler
from test_checkpoint import _snapshot, global_raw, local_raw, make_ptc

ONE_HOST = Placement(gpus_per_host=64)
GARBAGE = 0xAB  # what padding holds in sources: a reshard must not carry it over


def _copy(tensor, src_rank, dst_rank, src: Window, dst: Window, itemsize, from_new=False) -> Copy:
    return Copy(tensor, src_rank, dst_rank, src, dst, src.volume * itemsize, "host0", "host0", from_new)


def _plan(old: PTC, new: PTC, copies) -> Plan:
    total = sum(c.nbytes for c in copies)
    stats = PlanStats(total, total, total, 0, 0, copies=len(copies))
    return Plan(Deployment(old, ONE_HOST), Deployment(new, ONE_HOST), tuple(copies), stats)


def _window(piece, box: Region) -> Window:
    """The window of ``piece``'s local tensor that holds global ``box`` (inside the piece)."""
    g, loc = piece.global_region, piece.local_region
    if g.sizes == loc.sizes:
        return Window(box.relative_to(g).shift(loc.offsets))
    return Window(loc, g.sizes, box.relative_to(g))


def _replicate_to_split_plan(old: PTC, new: PTC, from_new_tensor: str | None = None) -> Plan:
    """Every new piece read from old rank 0 (which holds every tensor whole); optionally
    the copies of one tensor into ranks > 0 read new rank 0 instead (fan-out), listed first."""
    first, rest = [], []
    old_shards = dict(old.rank_shards(0))
    new_shards0 = dict(new.rank_shards(0))
    for r in range(new.config.world_size):
        for name, shard in new.rank_shards(r):
            size = raw_numpy(new.spec(name).dtype).itemsize
            for p in shard.pieces:
                if name == from_new_tensor and r > 0 and shard == new_shards0.get(name):
                    w = _window(p, p.global_region)
                    first.append(_copy(name, 0, r, w, w, size, from_new=True))
                    continue
                for q in old_shards[name].pieces:
                    cut = q.global_region.intersect(p.global_region)
                    if cut is not None:
                        rest.append(_copy(name, 0, r, _window(q, cut), _window(p, cut), size))
    return _plan(old, new, first + rest)


def _assert_ranks_equal(actual, expected):
    for r, tensors in expected.items():
        for name, arr in tensors.items():
            got = actual(r, name)
            assert got.shape == arr.shape and np.array_equal(got, arr), f"rank {r} tensor {name}"


# -- hand-made plans --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tp=2,pp=1,dp=1", "tp=4,pp=2,dp=1", "tp=2,pp=1,dp=2,zero=1"])
def test_hand_made_replicate_to_split_plan_into_files(tmp_path, layout):
    old, new = make_ptc("tp=1,pp=1,dp=1"), make_ptc(layout)
    glob = global_raw(old)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    plan = _replicate_to_split_plan(old, new, from_new_tensor="extra.mask")
    assert plan.copies[0].from_new  # listed first, must still run after the copies it reads
    seen = []
    with Checkpoint.open(tmp_path / "a") as src, CheckpointWriter(tmp_path / "b", new, dedup=False) as dst:
        moved = run_plan(plan, src, dst, workers=3, progress=seen.append).bytes
        dst.commit()
    assert moved == sum(seen) == plan.stats.total_bytes
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


def test_hand_made_plan_in_memory_torch_and_numpy():
    old, new = make_ptc("tp=1,pp=1,dp=1"), make_ptc("tp=2,pp=2,dp=2,zero=1")
    glob = global_raw(old, seed=5)
    plan = _replicate_to_split_plan(old, new, from_new_tensor="embed")
    assert plan.copies[0].from_new
    source = local_raw(old, glob)
    source[0] = {n: torch.from_numpy(a.view(np.int16)).view(getattr(torch, old.spec(n).dtype))
                 if a.dtype == np.uint16 else a for n, a in source[0].items()}  # bf16/fp16 as torch
    dest = {r: {n: np.full(a.shape, 7, a.dtype) for n, a in t.items()}
            for r, t in local_raw(new, glob).items()}
    run_plan(plan, ArraysSource(old, source), ArraysSink(new, dest), workers=2)
    _assert_ranks_equal(lambda r, n: dest[r][n], local_raw(new, glob, pad=0))


@pytest.mark.parametrize("cut", ["rows", "cols"])
def test_flat_zero_windows_with_sub_boxes(tmp_path, cut):
    """Copies into flat ZeRO shards that select part of the reshaped box: by rows (contiguous,
    streamed) or by columns (strided, copied through the mapping)."""
    specs = with_optimizer_state([TensorSpec("w", (6, 8), "bfloat16", Split(0)),
                                  TensorSpec("v", (5, 4), "bfloat16", Replicate())])
    old = PTC(ParallelConfig.parse("tp=1,pp=1,dp=1"), specs, 1)
    new = PTC(ParallelConfig.parse("tp=2,pp=1,dp=3,zero=1"), specs, 1)
    glob = global_raw(old, seed=2)
    copies = []
    for r in range(new.config.world_size):
        for name, shard in new.rank_shards(r):
            size = raw_numpy(new.spec(name).dtype).itemsize
            for p in shard.pieces:
                g = p.global_region
                if len(g.sizes) != 2 or g.sizes[0 if cut == "rows" else 1] < 2:
                    subs = [Region.full(g.sizes)]
                elif cut == "rows":
                    h = g.sizes[0] // 2
                    subs = [Region((0, 0), (h, g.sizes[1])), Region((h, 0), (g.sizes[0] - h, g.sizes[1]))]
                else:
                    h = g.sizes[1] // 2
                    subs = [Region((0, 0), (g.sizes[0], h)), Region((0, h), (g.sizes[0], g.sizes[1] - h))]
                for sub in subs:
                    src = Window(Region(tuple(a + b for a, b in zip(g.offsets, sub.offsets)), sub.sizes))
                    if p.local_region.sizes == g.sizes:
                        dst = Window(Region(tuple(a + b for a, b in zip(p.local_region.offsets, sub.offsets)), sub.sizes))
                    else:
                        dst = Window(p.local_region, g.sizes, sub)
                    copies.append(_copy(name, 0, r, src, dst, size))
    plan = _plan(old, new, copies)
    save_arrays(tmp_path / "a", old, local_raw(old, glob))
    with Checkpoint.open(tmp_path / "a") as src, CheckpointWriter(tmp_path / "b", new, dedup=False) as dst:
        run_plan(plan, src, dst)
        dst.commit()
    verify(tmp_path / "b")
    with Checkpoint.open(tmp_path / "b") as ck:
        _assert_ranks_equal(ck.view, local_raw(new, glob))


def test_plan_that_does_not_fit_is_rejected_before_writing():
    old, new = make_ptc("tp=1,pp=1,dp=1"), make_ptc("tp=2,pp=1,dp=1")
    glob = global_raw(old)
    good = _replicate_to_split_plan(old, new)
    bad = _copy("layers.1.fc", 0, 1, Window(Region((0, 0), (9, 8))), Window(Region((0, 0), (9, 8))), 2)
    dest = {r: {n: np.full(a.shape, 7, a.dtype) for n, a in t.items()} for r, t in local_raw(new, glob).items()}
    with pytest.raises(PlanError, match="destination window .* does not fit rank 1"):
        run_plan(_plan(old, new, good.copies + (bad,)), ArraysSource(old, local_raw(old, glob)),
                 ArraysSink(new, dest))
    assert all((a == 7).all() for t in dest.values() for a in t.values())
    mismatch = _copy("embed", 0, 0, Window(Region((0, 0), (2, 8))), Window(Region((0, 0), (8, 2))), 2)
    with pytest.raises(PlanError, match="source shape"):
        run_plan(_plan(old, new, (mismatch,)), ArraysSource(old, local_raw(old, glob)), ArraysSink(new, dest))


def test_wrong_layout_or_shape_is_a_clear_error(tmp_path):
    old, new = make_ptc("tp=1,pp=1,dp=1"), make_ptc("tp=2,pp=1,dp=1")
    glob = global_raw(old)
    plan = _replicate_to_split_plan(old, new)
    source = local_raw(old, glob)
    source[0]["layers.1.fc"] = source[0]["layers.1.fc"][:8]
    with pytest.raises(ValueError, match=r"source layers.1.fc of rank 0 has shape \[8, 8\].* is \[16, 8\]"):
        run_plan(plan, ArraysSource(old, source), ArraysSink(new, local_raw(new, glob)))
    save_arrays(tmp_path / "a", old, local_raw(old, glob))
    with Checkpoint.open(tmp_path / "a") as src, CheckpointWriter(tmp_path / "b", old, dedup=False) as dst:
        with pytest.raises(ValueError, match="destination holds layout tp=1,pp=1,dp=1 .* plan was made for tp=2"):
            run_plan(plan, src, dst)


def test_missing_source_array_is_a_clear_error():
    old, new = make_ptc("tp=1,pp=1,dp=1"), make_ptc("tp=2,pp=1,dp=1")
    glob = global_raw(old)
    source = local_raw(old, glob)
    del source[0]["embed"]
    dest = local_raw(new, glob)
    with pytest.raises(ValueError, match="no source array for tensor embed of rank 0"):
        run_plan(_replicate_to_split_plan(old, new), ArraysSource(old, source), ArraysSink(new, dest), workers=1)


# -- make_plan plans over checkpoints ---------------------------------------------------------

TRANSITIONS = [
    ("llama-tiny", "tp=1,pp=1,dp=1", "tp=2,pp=2,dp=1"),
    ("llama-tiny", "tp=2,pp=2,dp=1", "tp=1,pp=1,dp=2,zero=1"),
    ("llama-tiny", "tp=2,pp=1,dp=2,zero=1", "tp=1,pp=4,dp=2,zero=1"),
    ("llama-tiny", "tp=4,pp=1,dp=1", "tp=2,pp=2,dp=2,zero=1"),
    ("llama-tiny", "tp=1,pp=2,dp=2,stages=1+3", "tp=2,pp=2,dp=1,stages=3+1"),
    ("gpt-tiny", "tp=1,pp=1,dp=4,zero=1", "tp=4,pp=1,dp=1"),
    ("gpt-tiny", "tp=2,pp=4,dp=1", "tp=1,pp=1,dp=1"),
    ("gpt-tiny", "tp=4,pp=2,dp=2,zero=1", "tp=2,pp=1,dp=4,zero=1"),
]


@pytest.fixture
def memory_names():
    """Drops the memory:// checkpoints a test commits (they live as long as the process)."""
    before = set(memory_checkpoints())
    yield
    for name in set(memory_checkpoints()) - before:
        delete_memory_checkpoint(name)


def _location(tmp_path, backend: str, name: str) -> str:
    return str(tmp_path / name) if backend == "dir" else f"memory://{tmp_path.name}-{name}"


def _save(location: str, ptc: PTC, arrays, state=None) -> None:
    """Any backend's sink, filled by the identity plan from arrays in memory."""
    with create_sink(location, ptc, state) as sink:
        plan = identity_plan(ptc, range(ptc.config.world_size), stored=sink.stores)
        run_plan(plan, ArraysSource(ptc, arrays), sink)
        sink.commit()


def _contents(location: str):
    with open_source(location) as src:
        return src.state, {(r, n): src.read_window(r, n) for r in range(src.ptc.config.world_size)
                           for n, _ in src.ptc.rank_shards(r)}


@pytest.mark.parametrize("backend", ["dir", "memory"])
@pytest.mark.parametrize("model, a, b", TRANSITIONS)
def test_reshard_round_trip_on_every_backend(tmp_path, memory_names, backend, model, a, b):
    """The same planner and runner, checkpoints as directories or memory://: A -> B -> A."""
    old, new = model_ptc(model, a), model_ptc(model, b)
    glob = global_raw(old, seed=len(a) + len(b))
    at = lambda name: _location(tmp_path, backend, name)  # noqa: E731
    _save(at("a"), old, local_raw(old, glob, pad=GARBAGE), {"step": 11})
    before = _contents(at("a"))
    plan, seconds = reshard_checkpoint(at("a"), at("b"), b, workers=2)
    assert isinstance(seconds, ReshardTime) and float(seconds) == pytest.approx(
        seconds.plan + seconds.copy + seconds.verify + seconds.checksum + seconds.sync)
    assert seconds.run.bytes == plan.stats.total_bytes
    state, after = _contents(at("a"))
    assert state == before[0] and after.keys() == before[1].keys()
    assert all(np.array_equal(after[k], v) for k, v in before[1].items()), "the source changed"
    with open_source(at("b")) as ck:
        verify_source(ck)
        assert str(ck.ptc.config) == str(ParallelConfig.parse(b)) and ck.state["step"] == 11
        _assert_ranks_equal(ck.read_window, local_raw(new, glob, pad=0))
    reshard_checkpoint(at("b"), at("c"), a, workers=1)
    with open_source(at("c")) as ck:
        verify_source(ck)
        _assert_ranks_equal(ck.read_window, local_raw(old, glob, pad=0))


def test_reshard_between_backends(tmp_path, memory_names):
    old = model_ptc("llama-tiny", "tp=2,pp=1,dp=2,zero=1")
    glob = global_raw(old, seed=3)
    _save(str(tmp_path / "a"), old, local_raw(old, glob, pad=GARBAGE), {"step": 5})
    reshard_checkpoint(tmp_path / "a", f"memory://{tmp_path.name}-b", "tp=1,pp=2,dp=1")
    reshard_checkpoint(f"memory://{tmp_path.name}-b", tmp_path / "c", "tp=2,pp=1,dp=2,zero=1")
    with Checkpoint.open(tmp_path / "a") as a, Checkpoint.open(tmp_path / "c") as c:
        c.verify()
        assert c.state["step"] == 5
        _assert_ranks_equal(c.view, local_raw(old, glob, pad=0))
    with pytest.raises(FileExistsError, match="already exists"):
        reshard_checkpoint(tmp_path / "a", f"memory://{tmp_path.name}-b", "tp=1,pp=1,dp=1")


def test_fan_out_plan_across_hosts(tmp_path):
    """Two hosts: bytes needed by both ranks of host 1 cross once, then are copied from
    the new shard that received them (from_new copies)."""
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=4")
    place = Placement(gpus_per_host=2)
    plan = make_plan(Deployment(old, place), Deployment(new, place))
    assert any(c.from_new for c in plan.copies)
    glob = global_raw(old, seed=9)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    with Checkpoint.open(tmp_path / "a") as src, CheckpointWriter(tmp_path / "b", new, dedup=False) as dst:
        run_plan(plan, src, dst, workers=3)
        dst.commit()
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


def test_small_blocks_and_the_paths_taken(tmp_path, monkeypatch):
    """With 1 KiB blocks every loop of the streams and the assembly runs many times;
    merging tp=2 into tp=1 assembles split-along-dim-1 tensors and never writes through
    the mapping, so no tensor of the new checkpoint is read back to checksum it."""
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1024)
    calls = {"assemble": 0, "stream": 0, "strided": 0, "staged": 0}
    for name in calls:
        original = getattr(Filler, name)

        def spy(self, *args, _original=original, _name=name, **kw):
            calls[_name] += 1
            return _original(self, *args, **kw)

        monkeypatch.setattr(Filler, name, spy)
    readback = []
    original_checksums = writer_module.checksums

    def spy_checksums(jobs, pool=None):
        jobs = list(jobs)
        readback.extend(key for key, _ in jobs)
        return original_checksums(jobs, pool)

    monkeypatch.setattr(writer_module, "checksums", spy_checksums)
    old, new = model_ptc("llama-tiny", "tp=2,pp=1,dp=1"), model_ptc("llama-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=4)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    readback.clear()
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", "tp=1,pp=1,dp=1", workers=2)
    assert calls["assemble"] > 0 and calls["stream"] > 0 and calls["strided"] == calls["staged"] == 0
    assert readback == []
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


def test_stream_file_writes_a_file_range_block_by_block_with_each_blocks_crc(tmp_path, monkeypatch):
    """A run read from a file into the worker's buffer: the writes tile the destination
    from ``offset``, each carries its block's CRC-32, the one returned is the whole range's
    (oracles: the file's bytes and zlib); a file shorter than the range is an OSError."""
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1000)
    data = np.random.default_rng(5).integers(0, 256, 10_000, np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    writes, ticks = [], []
    filler = Filler(ticks.append, Clock())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        [crc] = filler.stream_file(fd, 123, [4567], lambda i, off, b, c: writes.append((i, off, bytes(b), c)))
        ticked = sum(ticks)
        with pytest.raises(OSError, match="ended 100 bytes early"):
            filler.stream_file(fd, 5000, [5100], lambda *a: None)
    finally:
        os.close(fd)
    assert crc == zlib.crc32(data[123:123 + 4567])
    assert [(i, off) for i, off, _, _ in writes] == [(0, off) for off in range(0, 4567, 1000)]
    assert b"".join(b for _, _, b, _ in writes) == data[123:123 + 4567]
    assert all(c == zlib.crc32(b) for _, _, b, c in writes) and ticked == 4567


def test_stream_file_cuts_blocks_at_the_pieces_they_hold(tmp_path, monkeypatch):
    """Pieces one after the other in a file (whole tensors of a chain): a block that holds
    the end of one piece and the start of the next is written as two shares, each at its
    offset in its own piece with its own CRC-32; pieces of no bytes are skipped; every
    piece's CRC-32 is returned (oracles: slices of the file's bytes and zlib)."""
    monkeypatch.setattr(transfer, "CHUNK_BYTES", 1000)
    data = np.random.default_rng(6).integers(0, 256, 10_000, np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    sizes = [10, 0, 2500, 1, 990, 0, 1500]
    writes = []
    filler = Filler(lambda n: None, Clock())
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        crcs = filler.stream_file(fd, 77, sizes, lambda i, off, b, c: writes.append((i, off, bytes(b), c)))
    finally:
        os.close(fd)
    starts = [77 + sum(sizes[:i]) for i in range(len(sizes))]
    assert crcs == [zlib.crc32(data[s:s + n]) for s, n in zip(starts, sizes)]
    for i, off, b, c in writes:
        assert b == data[starts[i] + off:starts[i] + off + len(b)] and c == zlib.crc32(b) and b
    for i, n in enumerate(sizes):  # each piece tiled, in order
        offs = [(off, len(b)) for j, off, b, _ in writes if j == i]
        assert sum(k for _, k in offs) == n and all(a + k == b for (a, k), (b, _) in zip(offs, offs[1:]))
    assert max(len(b) for _, _, b, _ in writes) <= 1000 and len(writes) > sum(1 for n in sizes if n)


def test_worker_count_does_not_change_the_bytes(tmp_path):
    old = model_ptc("llama-tiny", "tp=1,pp=2,dp=2,zero=1")
    save_arrays(tmp_path / "a", old, local_raw(old, global_raw(old, seed=1), pad=GARBAGE))
    for workers in (1, 4):
        reshard_checkpoint(tmp_path / "a", tmp_path / f"w{workers}", "tp=2,pp=1,dp=2,zero=1", workers=workers)
    one, four = _snapshot(tmp_path / "w1"), _snapshot(tmp_path / "w4")
    assert one.keys() == four.keys()
    for name in one:
        if name != "manifest.json":
            assert one[name] == four[name], name


@pytest.mark.parametrize("verify", [False, True])
def test_a_reshard_leaves_no_mapping_of_its_source(tmp_path, verify):
    """Once the reshard returns, no page of the source's files is mapped in this process:
    the runner drops the arrays it held (a view kept alive past the source's close keeps
    its mapping until the collector happens by). The garbage collector is off throughout."""
    import gc

    old = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    save_arrays(tmp_path / "a", old, local_raw(old, global_raw(old)))
    gc.collect()
    gc.disable()
    try:
        reshard_checkpoint(tmp_path / "a", tmp_path / "b", "tp=1,pp=2,dp=2,zero=1", workers=2, verify=verify)
        with open("/proc/self/maps") as f:
            mapped = [line for line in f if str(tmp_path / "a") in line]
    finally:
        gc.enable()
    assert mapped == []


def test_reshard_opened_then_run(tmp_path, monkeypatch):
    """``Reshard`` opens the source once, checks and plans before writing anything: its
    ``total_bytes`` are the new rank files' tensor bytes (read from the written files'
    own safetensors headers); leaving without ``run`` writes nothing and closes the source."""
    import json
    import scalai.reshard as reshard_module

    old = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    save_arrays(tmp_path / "a", old, local_raw(old, global_raw(old)))
    opened, closed = [], []
    real_open = reshard_module.open_source

    def counted(location):
        source = real_open(location)
        real_close = source.close
        source.close = lambda: closed.append(location) or real_close()
        opened.append(location)
        return source

    monkeypatch.setattr(reshard_module, "open_source", counted)
    with Reshard(tmp_path / "a", tmp_path / "unused", "tp=1,pp=2,dp=2,zero=1") as job:
        assert (str(job.old), str(job.new)) == ("tp=2,pp=1,dp=1", "tp=1,pp=2,dp=2,zero=1")
    assert len(opened) == len(closed) == 1 and sorted(os.listdir(tmp_path)) == ["a"]
    with Reshard(tmp_path / "a", tmp_path / "b", "tp=1,pp=2,dp=2,zero=1") as job:
        seconds = job.run(workers=2)
    assert len(opened) == len(closed) == 2 and seconds.run.bytes == job.plan.stats.total_bytes
    stored = 0
    for name in os.listdir(tmp_path / "b"):
        if name.endswith(".safetensors"):
            with open(tmp_path / "b" / name, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            stored += sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    assert stored == job.total_bytes > 0


def test_reshard_refuses_existing_output_and_bad_layout(tmp_path):
    old = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    save_arrays(tmp_path / "a", old, local_raw(old, global_raw(old)))
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        reshard_checkpoint(tmp_path / "a", tmp_path / "b", "tp=2,pp=1,dp=1")
    assert os.listdir(tmp_path / "b") == []
    with pytest.raises(ValueError, match="tp=3"):
        reshard_checkpoint(tmp_path / "a", tmp_path / "c", "tp=3,pp=1,dp=1")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# -- pure helpers -----------------------------------------------------------------------------

@st.composite
def _shape_and_region(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
    offsets, sizes = [], []
    for n in shape:
        lo = draw(st.integers(0, n - 1))
        offsets.append(lo)
        sizes.append(draw(st.integers(1, n - lo)))
    return shape, Region(tuple(offsets), tuple(sizes))


@settings(max_examples=120, deadline=None)
@given(_shape_and_region())
def test_window_span_is_the_single_flat_run(case):
    shape, region = case
    runs = flat_runs(shape, region)
    expected = runs[0][0] if len(runs) == 1 else None
    assert transfer.window_span(shape, Window(region)) == expected


@settings(max_examples=120, deadline=None)
@given(_shape_and_region(), st.integers(1, 40))
def test_blocks_cover_the_array_in_order(case, max_elems):
    shape, _ = case
    a = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    parts = [a[index] for index in transfer.blocks(shape, max_elems)]
    assert all(p.size <= max_elems for p in parts)
    assert np.array_equal(np.concatenate([p.reshape(-1) for p in parts]), a.reshape(-1))


# -- memory bound -----------------------------------------------------------------------------

def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssAnon:"))


@pytest.mark.parametrize("a, b", [("tp=2,pp=1,dp=1", "tp=1,pp=1,dp=1"), ("tp=1,pp=1,dp=1", "tp=4,pp=1,dp=1")])
def test_reshard_memory_stays_bounded(tmp_path, a, b):
    """A 64 MiB tensor split along dim 1 (strided on one side): the executor's own memory
    (anonymous pages, sampled every millisecond) grows by its worker buffers, not the tensor."""
    import threading

    specs = [TensorSpec("w", (2048, 8192), "float32", Split(1))]
    old = PTC(ParallelConfig.parse(a), specs, 1)
    with CheckpointWriter(tmp_path / "a", old) as w:
        rng = np.random.default_rng(0)
        for r in range(old.config.world_size):
            view = w.array(r, "w")
            for lo in range(0, view.shape[0], 256):
                view[lo:lo + 256] = rng.integers(0, 2**32, size=view[lo:lo + 256].shape, dtype=np.uint32)
        w.commit()
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            stop.wait(0.001)

    base = _rss_anon()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reshard_checkpoint(tmp_path / "a", tmp_path / "b", b, workers=2)
    finally:
        stop.set()
        sampler.join()
    assert peak[0] - base < 24 << 20, f"anonymous memory grew by {(peak[0] - base) >> 20} MiB"
    with Checkpoint.open(tmp_path / "a") as src, Checkpoint.open(tmp_path / "b") as dst:
        dst.verify()
        for lo in range(0, 2048, 512):
            box = Region((lo, 0), (512, 8192))
            assert np.array_equal(src.read_global("w", box), dst.read_global("w", box))


def test_plans_into_a_deduplicating_checkpoint_fill_each_replica_once(tmp_path):
    """A checkpoint writer stores each replica once: a plan made for ``stored_replicas()``
    fills exactly that, fan-out included; a plan for every replica is refused."""
    from scalai.config import Placement
    from scalai.planner import Deployment, make_plan

    old, new = make_ptc("tp=2,pp=1,dp=1"), make_ptc("tp=1,pp=2,dp=4")
    glob = global_raw(old)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    hosts = Placement(2)  # 8 new ranks on 4 hosts: bytes fetched once per host, then fanned out
    stored = make_plan(Deployment(old, hosts), Deployment(new.stored_replicas(), hosts))
    full = make_plan(Deployment(old, hosts), Deployment(new, hosts))
    assert stored.stats.total_bytes < full.stats.total_bytes
    with Checkpoint.open(tmp_path / "a") as src:
        with CheckpointWriter(tmp_path / "refused", new) as dst:
            with pytest.raises(PlanError, match="stored_replicas"):
                run_plan(full, src, dst)
        with CheckpointWriter(tmp_path / "b", new) as dst:
            assert run_plan(stored, src, dst).bytes == stored.stats.total_bytes
            dst.commit()
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


@pytest.mark.parametrize("refused", [False, True])
def test_whole_tensors_copy_file_to_file_in_the_kernel(tmp_path, monkeypatch, refused):
    """Whole source tensors go file to file with copy_file_range (their recorded CRCs carried
    over); where the kernel refuses (e.g. across filesystems) the runner writes them from the
    mappings instead. Either way the result verifies and equals the expected layout."""
    import errno

    real = os.copy_file_range
    calls = []

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if refused:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=8)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", "tp=1,pp=1,dp=1", workers=2)
    assert calls, "whole tensors were offered to the kernel"
    assert refused or sum(calls) > new.rank_nbytes(0) // 4
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


@pytest.mark.parametrize("new_layout", ["tp=1,pp=2,dp=1", "tp=1,pp=1,dp=2,zero=1"])
def test_whole_tensors_consecutive_in_both_files_share_one_kernel_copy(tmp_path, monkeypatch, new_layout):
    """Whole tensors that lie one after the other in a source file and in a new file are
    copied by one copy_file_range call (a pipeline stage's share of a file, a ZeRO part's
    run of whole moments). Every call copies whole source tensors, consecutive in their
    file (the source's own table of offsets is the oracle), fewer calls than tensors, and
    the result verifies and equals the expected layout."""
    real, calls = os.copy_file_range, []

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append((offset_src, count))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    old, new = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"), model_ptc("gpt-tiny", new_layout)
    glob = global_raw(old, seed=12)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    with Checkpoint.open(tmp_path / "a") as ck:
        ends = {ck.file_range(0, n)[1]: ck.file_range(0, n)[1] + ck.view(0, n).nbytes for n in ck.stored(0)}
        names = {ck.file_range(0, n)[1]: n for n in ck.stored(0)}
        dims = {n: ck.view(0, n).ndim for n in ck.stored(0)}
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", new_layout, workers=2)
    joined, states = 0, 0
    for offset, count in calls:
        if offset not in ends or offset + count <= ends[offset]:
            continue  # one tensor, or a run of one (a vocabulary without its padding rows)
        at, held = offset, []
        while at < offset + count:  # whole tensors, one after the other
            assert at in ends, f"a call of {count} bytes at {offset} ends inside a tensor"
            held.append(names[at])
            at = ends[at]
        assert at == offset + count, f"a call of {count} bytes at {offset} ends inside a tensor"
        joined += 1
        states += any(n.startswith("optimizer.") and dims[n] > 1 for n in held)
    assert joined, "consecutive tensors were joined into one kernel copy"
    if "zero=1" in new_layout:  # matrices' states become flat ZeRO pieces, byte for byte: they join too
        assert states, "no kernel copy joined the optimizer state of a matrix into a ZeRO part"
    assert len(calls) < len(ends), (len(calls), len(ends))
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


@pytest.mark.parametrize("new_layout", ["tp=1,pp=2,dp=1", "tp=1,pp=1,dp=2,zero=1"])
def test_checked_tensors_consecutive_in_both_files_are_read_as_one_stream(tmp_path, monkeypatch, new_layout):
    """With the source check, whole tensors consecutive in both files pass through the
    process as one stream of block reads: some read holds the end of one source tensor
    and the start of the next (the source's own table of offsets is the oracle), there
    are fewer reads than tensors, and the result verifies and equals the expected layout."""
    real, reads = os.preadv, []

    def spy(fd, buffers, offset, *rest):
        got = real(fd, buffers, offset, *rest)
        reads.append((offset, got))
        return got

    monkeypatch.setattr(os, "preadv", spy)
    old, new = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1"), model_ptc("gpt-tiny", new_layout)
    glob = global_raw(old, seed=13)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    with Checkpoint.open(tmp_path / "a") as ck:
        starts = sorted(ck.file_range(0, n)[1] for n in ck.stored(0))
    reads.clear()
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", new_layout, workers=2, verify=True)
    across = [(o, n) for o, n in reads if any(o < s < o + n for s in starts)]
    assert across, "no read held the bytes of two consecutive tensors"
    assert len(reads) < len(starts), (len(reads), len(starts))
    with Checkpoint.open(tmp_path / "b") as ck:
        ck.verify()
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


@pytest.mark.parametrize("model, layout, inside", [("gpt-tiny", "tp=1,pp=1,dp=2,zero=1", False),
                                                  ("llama-tiny", "tp=1,pp=1,dp=3,zero=1", True)])
def test_most_of_a_tensor_copies_in_the_kernel_with_a_derived_crc(tmp_path, monkeypatch, model, layout, inside):
    """A copy of one run of more than half a source tensor (the larger side of a ZeRO split,
    a vocabulary without its padding rows) goes file to file too, its CRC derived from the
    recorded one and from the bytes around the run; copies adjacent in both tensors (a
    fused QKV's head groups) are one run. The new files' recorded CRCs equal zlib's over
    their bytes, and no byte of the source's padding is carried over."""
    real, calls = os.copy_file_range, []

    def spy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append((offset_src, count))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    old, new = model_ptc(model, "tp=1,pp=1,dp=1"), model_ptc(model, layout)
    glob = global_raw(old, seed=9)
    save_arrays(tmp_path / "a", old, local_raw(old, glob, pad=GARBAGE))
    with Checkpoint.open(tmp_path / "a") as ck:
        spans = {ck.file_range(0, n)[1]: ck.view(0, n).nbytes for n in ck.stored(0)}
    plan, _ = reshard_checkpoint(tmp_path / "a", tmp_path / "b", new.config, workers=2)
    qkv = "optimizer.master.decoder.layers.0.self_attention.linear_qkv.weight"
    with Checkpoint.open(tmp_path / "a") as ck:
        start, nbytes = ck.file_range(0, qkv)[1], ck.view(0, qkv).nbytes
    if sum(c.tensor == qkv for c in plan.copies) > 1 and not inside:  # head groups, adjacent both sides
        # one kernel copy holds the whole tensor (alone, or in a chain with its neighbours)
        assert any(o <= start and start + nbytes <= o + n for o, n in calls), "adjacent copies merged"
        assert not any(start < o < start + nbytes for o, _ in calls), "a kernel copy starts inside the tensor"
    if inside:  # the larger side of a ZeRO split
        assert any(offset not in spans for offset, _ in calls), "a run starting inside a tensor"
    else:  # a vocabulary without its padding rows
        assert any(offset in spans and count < spans[offset] for offset, count in calls), "a run ending early"
    with Checkpoint.open(tmp_path / "b") as ck:
        for r in range(new.config.world_size):
            for n in ck.stored(r):
                assert ck.checksum(r, n) == zlib.crc32(np.ascontiguousarray(ck.view(r, n))), (r, n)
        _assert_ranks_equal(ck.view, local_raw(new, glob, pad=0))


def test_a_failed_copy_stops_the_source_check_alongside_it(tmp_path, monkeypatch):
    """reshard_checkpoint(verify=True) checks the source on a thread of its own while the
    copy runs; when the copy fails, its error is the one raised, the check stops, and no
    output or thread is left."""
    import threading

    import scalai.reshard as reshard_module

    old = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    save_arrays(tmp_path / "a", old, local_raw(old, global_raw(old, seed=2)))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reshard_module, "run_plan", broken)
    with pytest.raises(OSError, match="No space left"):
        reshard_checkpoint(tmp_path / "a", tmp_path / "b", "tp=1,pp=1,dp=1", verify=True)
    assert not (tmp_path / "b").exists() and [p.name for p in tmp_path.iterdir()] == ["a"]
    assert not [t for t in threading.enumerate() if t.name.startswith("scalai-verify")]


def test_the_dealer_keeps_each_thread_to_its_own_files_and_hands_out_every_task_once():
    """Two threads, three destination ranks (files): each thread writes only the ranks dealt
    to it while they last (the largest rank alone on one thread), then helps with the rank
    that has the most bytes left; every task comes out once, each rank's in phase order."""
    from scalai.storage.tasks import Dealer, Task

    sizes = {0: [50, 40, 30], 1: [20, 20], 2: [10, 10, 10, 10]}  # bytes: rank 0 120, rank 1 40, rank 2 40
    phase = [Task("arrays", r, f"t{r}.{i}", [], n) for r, ns in sizes.items() for i, n in enumerate(ns)]
    dealer = Dealer(phase, 2)
    assert sorted(map(sorted, dealer.dealt)) == [[0], [1, 2]]
    heavy, seq = dealer.dealt.index([0]), []
    light = 1 - heavy

    def take(worker):
        task = dealer.next(worker)
        if task is not None:
            seq.append((worker, task))
        return task

    assert take(heavy).rank == 0  # the heavy thread starts its rank 0 ...
    while (t := take(light)) is not None:  # ... the light one does ranks 1 and 2, then helps
        pass
    light_ranks = [t.rank for w, t in seq if w == light]
    assert set(light_ranks[:6]) == {1, 2} and set(light_ranks[6:]) <= {0}
    assert take(heavy) is None
    assert sorted(id(t) for _, t in seq) == sorted(id(t) for t in phase)  # each task exactly once
    for r in sizes:  # in phase order within each rank
        assert [t for _, t in seq if t.rank == r] == [t for t in phase if t.rank == r]


def test_a_dealer_thread_done_with_its_files_helps_where_no_other_thread_writes():
    """Thread X holds rank 0, thread Y ranks 1 and 2. X finishes rank 0 while Y writes
    rank 1, which has more bytes left than rank 2: X goes to rank 2, which nobody writes
    (joining rank 1 would wait for Y's turn on the file); once every rank left is being
    written, a thread joins the one with the most bytes left."""
    from scalai.storage.tasks import Dealer, Task

    sizes = {0: [50, 30], 1: [30, 30], 2: [10, 10]}
    phase = [Task("arrays", r, f"t{r}.{i}", [], n) for r, ns in sizes.items() for i, n in enumerate(ns)]
    dealer = Dealer(phase, 2)
    x, y = dealer.dealt.index([0]), dealer.dealt.index([1, 2])
    assert (dealer.next(x).nbytes, dealer.next(y).rank, dealer.next(x).nbytes) == (50, 1, 30)
    assert dealer.next(x).rank == 2  # rank 1 has 30 bytes left but Y writes it
    assert dealer.next(y).rank == 1  # Y keeps to its own rank
    assert dealer.next(x).rank == 2 and dealer.next(x) is None  # rank 2 done, rank 1's last task taken


def test_a_dealer_thread_drains_its_files_together_so_a_helper_finds_one_nobody_writes():
    """Thread X holds rank 0, thread Y ranks 1 and 2. Y takes its next task from its rank
    with the most bytes left, so when X is done with rank 0, rank 1 still has bytes and Y
    writes rank 2: X helps with rank 1 and no file has two writers. Filling its ranks one
    after the other (``in_order``, a sink that streams its files in order), Y would have
    only rank 2 left, and both threads would write it."""
    from scalai.storage.tasks import Dealer, Task

    sizes = {0: [60, 40], 1: [25, 25], 2: [25, 25]}
    phase = [Task("arrays", r, f"t{r}.{i}", [], n) for r, ns in sizes.items() for i, n in enumerate(ns)]
    dealer = Dealer(phase, 2)
    x, y = dealer.dealt.index([0]), dealer.dealt.index([1, 2])
    assert [dealer.next(x).rank, dealer.next(y).rank, dealer.next(y).rank, dealer.next(x).rank] == [0, 1, 2, 0]
    assert dealer.next(x).rank == 1  # Y writes rank 2; rank 1's last task is nobody's
    assert dealer.next(y).rank == 2 and dealer.next(y) is None and dealer.next(x) is None

    ordered = Dealer(phase, 2, in_order=True)
    x, y = ordered.dealt.index([0]), ordered.dealt.index([1, 2])
    assert [ordered.next(x).rank, ordered.next(y).rank, ordered.next(y).rank, ordered.next(x).rank] == [0, 1, 1, 0]
    assert ordered.next(x).rank == 2 and ordered.next(y).rank == 2  # one file, two writers


@pytest.mark.parametrize("old_layout,new_layout", [
    ("tp=2,pp=1,dp=1", "tp=1,pp=1,dp=1"),  # runs, rows assembled from both shards, replicas never read
    ("tp=1,pp=1,dp=1", "tp=1,pp=2,dp=1"),  # whole tensors, vocabulary padding no copy reads
    ("tp=1,pp=2,dp=1", "tp=1,pp=2,dp=2,zero=1"),  # ZeRO splits
    ("tp=1,pp=2,dp=2,zero=1", "tp=2,pp=1,dp=1"),  # flat ZeRO shards gathered back
])
def test_reshard_verify_catches_a_flipped_byte_wherever_it_is(tmp_path, monkeypatch, old_layout, new_layout):
    """Every stored source tensor is checked, whether its bytes pass through the copy
    (checked on the way) or not (checked alongside): a byte flipped at its start, middle
    or end (vocabulary padding, which no copy reads) fails the reshard, naming the file
    and the tensor, and nothing is committed. The oracle is the flip itself."""
    import scalai.storage.run as run_module
    from scalai.errors import ChecksumError

    old = model_ptc("llama-tiny", old_layout)
    src = tmp_path / "src"
    save_arrays(src, old, local_raw(old, global_raw(old, seed=3), pad=GARBAGE))
    skipped = []
    real_verify = run_module.verify_source

    def spy(source, ranks=None, workers=None, stop=None, skip=()):
        skipped.append(set(skip))
        return real_verify(source, ranks, workers, stop, skip=skip)

    monkeypatch.setattr(run_module, "verify_source", spy)
    reshard_checkpoint(src, tmp_path / "clean", new_layout, workers=2, verify=True)
    assert len(skipped) == 1 and skipped[0], "nothing was checked on the way"
    with Checkpoint.open(src) as ck:
        entries = [(r, name, ck.file_range(r, name)) for r in range(old.config.world_size) for name in ck.stored(r)]
    rng = np.random.default_rng(0)
    picks = [entries[i] for i in sorted(set(rng.choice(len(entries), size=min(12, len(entries)), replace=False)))]
    picks += [e for e in entries if e[1] in ("embedding.word_embeddings.weight", "output_layer.weight")][:2]
    on_the_way = 0
    for n, (rank, name, (_, start)) in enumerate(picks):
        path = src / f"rank-{rank:05d}.safetensors"
        with Checkpoint.open(src) as ck:
            size = ck.array(rank, name).nbytes
        for where in (start, start + size // 2, start + size - 1):
            on_the_way += (rank, name) in skipped[0]
            raw = bytearray(path.read_bytes())
            raw[where] ^= 0x5A
            path.write_bytes(bytes(raw))
            out = tmp_path / f"out{n}-{where}"
            try:
                with pytest.raises(ChecksumError, match=f"rank-{rank:05d}.*tensor {name}:"):
                    reshard_checkpoint(src, out, new_layout, workers=2, verify=True)
            finally:
                raw[where] ^= 0x5A
                path.write_bytes(bytes(raw))
            assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(f".out{n}")]
    assert on_the_way, "no flipped tensor was one checked on the way"


def test_padding_of_flat_shards_is_found_from_the_windows_runs():
    """``uncovered`` of a flat tensor (ZeRO shards: many windows, views of its ranges) names
    exactly the elements no window selects; the oracle marks each window's selection in a
    boolean array with numpy's own indexing."""
    from scalai.storage.tasks import uncovered

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(1, 400))
        windows = []
        for _ in range(int(rng.integers(0, 80))):
            a = int(rng.integers(0, n))
            b = int(rng.integers(a + 1, n + 1))
            if rng.random() < 0.5 or b - a < 4:
                windows.append(Window(Region((a,), (b - a,))))
                continue
            rows = next(r for r in (4, 3, 2, 1) if (b - a) % r == 0)
            view = (rows, (b - a) // rows)
            r0 = int(rng.integers(0, rows))
            c0 = int(rng.integers(0, view[1]))
            sub = Region((r0, c0), (int(rng.integers(1, rows - r0 + 1)), int(rng.integers(1, view[1] - c0 + 1))))
            windows.append(Window(Region((a,), (b - a,)), view, sub))
        mask = np.zeros(n, bool)
        for w in windows:
            w.select(mask)[...] = True
        gaps = uncovered((n,), windows)
        got = np.zeros(n, bool)
        for box in gaps:
            assert box.volume and not got[box.to_slices()].any()  # disjoint, not empty
            got[box.to_slices()] = True
        assert np.array_equal(got, ~mask)


def test_a_tensor_expected_to_pass_whole_but_not_seen_is_still_checked(tmp_path, monkeypatch):
    """The runner predicts which source tensors its copy checks on the way; one whose bytes
    it did not see after all (here: their CRC-32s dropped on purpose) is checked at the
    end, so a flipped byte in it still fails the reshard."""
    import scalai.storage.run as run_module
    from scalai.errors import ChecksumError
    from scalai.storage.pieces import CrcCheck

    old = model_ptc("llama-tiny", "tp=1,pp=1,dp=1")
    src = tmp_path / "src"
    save_arrays(src, old, local_raw(old, global_raw(old, seed=6), pad=GARBAGE))
    name = max((n for n, _ in old.rank_shards(0)), key=lambda n: int(np.prod(old.spec(n).shape)))
    add = CrcCheck.add
    monkeypatch.setattr(run_module.CrcCheck, "add", lambda self, key, *a: None if key[1] == name else add(self, key, *a))
    passing = []
    real = run_module._Run._read_whole
    monkeypatch.setattr(run_module._Run, "_read_whole", lambda self: (real(self), passing.append(dict(self.passing))))
    with Checkpoint.open(src) as ck:
        _, start = ck.file_range(0, name)
    path = src / "rank-00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[start + 5] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match=f"tensor {name}:"):
        reshard_checkpoint(src, tmp_path / "out", "tp=1,pp=2,dp=1", workers=2, verify=True)
    assert (0, name) in passing[0], "the tensor was expected to pass whole"
    assert not (tmp_path / "out").exists()
