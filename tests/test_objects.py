"""Checkpoints on object storage through fsspec (scalai.checkpoint.objects), here on fsspec's
in-memory filesystem: the same round trips as every other source and sink, reads of exactly
the bytes a plan needs, and what an interrupted or aborted save leaves. Expected values come
from the tests' own slicing of random global tensors (test_checkpoint.global_raw/local_raw);
the bytes a reshard must read are counted from the layouts' pieces, not from the plan."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from scalai.config import Placement
from scalai.errors import CheckpointError
from scalai.dtypes import itemsize
from scalai.models import model_ptc
from scalai.planner import Deployment, identity_plan, make_plan
from scalai.storage import ArraysSink, ArraysSource, run_plan
from scalai.storage.verify import verify_source
from scalai.checkpoint.object_source import ObjectSource
from scalai.checkpoint.objects import ObjectSink
from test_checkpoint import global_raw, local_raw
from test_storage import CASES

fsspec = pytest.importorskip("fsspec")
_ids = itertools.count()


@pytest.fixture
def memfs():
    from fsspec.implementations.memory import MemoryFileSystem

    fs = MemoryFileSystem()
    prefix = f"memory://scalai-test-objects/{next(_ids)}"
    yield fs, prefix
    root = prefix.split("://")[1]
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _save(fs, url, ptc, arrays, state=None):
    with ObjectSink(url, ptc, state, fs=fs) as sink:
        run_plan(identity_plan(ptc, range(ptc.config.world_size), stored=sink.stores), ArraysSource(ptc, arrays),
                 sink, workers=2)
        sink.commit()
    return sink


def _one_host(old, new):
    place = Placement(max(old.config.world_size, new.config.world_size))
    return make_plan(Deployment(old, place), Deployment(new, place))


def _checking_load(url, fs, old, new, want, check_all=False) -> int:
    """A load with verify from ``url`` into zeroed arrays of ``new``'s rank 0 (old rank 1's
    file read whole, the other's layout from the manifest: ``others_checked``), compared
    with ``want``; with ``check_all``, every stored tensor's CRC-32 checked afterwards.
    Returns the header bytes the source fetched apart."""
    with ObjectSource(url, fs=fs) as source:
        source.read_whole([1], others_checked=True)
        dest = {0: {n: np.zeros(x.shape, x.dtype) for n, x in want.items()}}
        run_plan(_one_host(old, new), source, ArraysSink(new, dest), workers=2)
        assert all(np.array_equal(dest[0][n], x) for n, x in want.items())
        if check_all:
            verify_source(source, range(old.config.world_size))
        return source.header_bytes


def _needed_bytes(ptc) -> int:
    """Bytes of real (non-padding) elements of every tensor a rank stores itself: what a
    reshard into ``ptc`` from a ranged source must read, each once."""
    total = 0
    for r in range(ptc.config.world_size):
        for name, shard in ptc.rank_shards(r):
            if ptc.replica_owner(name, r) == r:
                total += sum(p.local_region.volume for p in shard.pieces) * itemsize(ptc.spec(name).dtype)
    return total


@pytest.mark.parametrize("model, a, b", CASES)
def test_round_trip_through_objects_across_layouts(memfs, model, a, b):
    fs, prefix = memfs
    old, new = model_ptc(model, a), model_ptc(model, b)
    glob = global_raw(old, seed=3)
    _save(fs, f"{prefix}/a", old, local_raw(old, glob, pad=0), {"step": 7})
    with ObjectSource(f"{prefix}/a", fs=fs, max_gap_bytes=0) as source:
        assert source.state == {"step": 7}
        verify_source(source)
        expected = local_raw(new, glob, pad=0)
        dest = {r: {n: np.full(x.shape, 9, x.dtype) for n, x in t.items()} for r, t in expected.items()}
        plan = _one_host(old, new)
        run_plan(plan, source, ArraysSink(new, dest), workers=2)
        for r, tensors in expected.items():
            for name, want in tensors.items():
                assert np.array_equal(dest[r][name], want), f"rank {r} {name}"
        # a reshard object -> object, and back: equal bit for bit
        sink_plan = make_plan(Deployment(old, Placement(64)), Deployment(new.stored_replicas(), Placement(64)))
        before = source.fetched  # headers are read already
        with ObjectSink(f"{prefix}/b", new, source.state, fs=fs) as sink:
            run_plan(sink_plan, source, sink, workers=2)
            sink.commit()
        # no byte beyond what the plan needs (windows of one read_many call that overlap
        # are fetched once)
        assert source.fetched - before <= _needed_bytes(new), "each needed byte read at most once"
    with ObjectSource(f"{prefix}/b", fs=fs) as b_src:
        verify_source(b_src)
        back = make_plan(Deployment(new, Placement(64)), Deployment(old.stored_replicas(), Placement(64)))
        with ObjectSink(f"{prefix}/c", old, b_src.state, fs=fs) as sink:
            run_plan(back, b_src, sink, workers=2)
            sink.commit()
    root = prefix.split("://")[1]
    for r in range(old.config.world_size):  # the round trip rewrote the very same objects
        name = f"rank-{r:05d}.safetensors"
        assert fs.cat_file(f"{root}/a/{name}") == fs.cat_file(f"{root}/c/{name}")
    assert fs.cat_file(f"{root}/a/manifest.json") == fs.cat_file(f"{root}/c/manifest.json")


def test_an_interrupted_save_leaves_no_manifest_and_the_next_save_sweeps_it(memfs):
    fs, prefix = memfs
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=2")
    arrays = local_raw(ptc, global_raw(ptc, seed=1))
    url, root = f"{prefix}/ckpt", f"{prefix.split('://')[1]}/ckpt"
    sink = ObjectSink(url, ptc, fs=fs)
    run_plan(identity_plan(ptc, range(ptc.config.world_size), stored=sink.stores), ArraysSource(ptc, arrays), sink)
    sink.finish()  # every rank file uploaded, then the writer "dies": no commit, no abort
    assert any(n.endswith(".safetensors") for n in fs.ls(root, detail=False))
    assert not fs.exists(f"{root}/manifest.json")
    with pytest.raises(CheckpointError, match="no manifest.json: nothing was committed"):
        ObjectSource(url, fs=fs)
    _save(fs, url, ptc, arrays)  # a later save to the same URL removes the leftovers first
    with ObjectSource(url, fs=fs) as source:
        verify_source(source)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        ObjectSink(url, ptc, fs=fs)


def test_abort_removes_what_was_uploaded(memfs):
    fs, prefix = memfs
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    arrays = local_raw(ptc, global_raw(ptc, seed=2))
    with ObjectSink(f"{prefix}/x", ptc, fs=fs) as sink:
        run_plan(identity_plan(ptc, range(ptc.config.world_size), stored=sink.stores), ArraysSource(ptc, arrays),
                 sink)
    root = f"{prefix.split('://')[1]}/x"
    assert not fs.exists(root) or fs.ls(root, detail=False) == []


def test_a_damaged_object_is_named(memfs):
    fs, prefix = memfs
    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    _save(fs, f"{prefix}/d", ptc, local_raw(ptc, global_raw(ptc, seed=4)))
    root = f"{prefix.split('://')[1]}/d"
    data = bytearray(fs.cat_file(f"{root}/rank-00000.safetensors"))
    fs.pipe_file(f"{root}/rank-00000.safetensors", bytes(data[:len(data) // 2]))
    with ObjectSource(f"{prefix}/d", fs=fs) as source, pytest.raises(CheckpointError, match="rank-00000"):
        verify_source(source)


def test_a_plan_reading_a_file_whole_checks_it_on_the_way_and_finds_a_flipped_byte(memfs):
    """Streamed reads check every tensor whose bytes all pass (load's verify, with no second
    pass); a byte flipped inside a tensor fails the run naming that tensor."""
    from scalai.errors import ChecksumError

    fs, prefix = memfs
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=6)
    _save(fs, f"{prefix}/w", old, local_raw(old, glob))
    plan = _one_host(old, new)
    with ObjectSource(f"{prefix}/w", fs=fs) as source:
        source.read_whole([0, 1])
        dest = {0: {n: np.zeros(x.shape, x.dtype) for n, x in local_raw(new, glob)[0].items()}}
        run_plan(plan, source, ArraysSink(new, dest), workers=2)
        stored = {(r, n) for r in range(2) for n in source.stored(r)}
        assert stored == source.crcs.checked, "every stored tensor checked while the plan read it"
        requests = source.requests
        verify_source(source)  # nothing left to check: no request
        assert source.requests == requests
    root = f"{prefix.split('://')[1]}/w"
    with ObjectSource(f"{prefix}/w", fs=fs) as source:
        entry = source.entries(1)["decoder.layers.1.mlp.linear_fc1.weight"]
        data = bytearray(fs.cat_file(f"{root}/rank-00001.safetensors"))
        data[entry.start + entry.nbytes // 2] ^= 0x40
        fs.pipe_file(f"{root}/rank-00001.safetensors", bytes(data))
        source.read_whole([1])
        dest = {0: {n: np.zeros(x.shape, x.dtype) for n, x in local_raw(new, glob)[0].items()}}
        with pytest.raises(ChecksumError, match="rank-00001.*decoder.layers.1.mlp.linear_fc1.weight"):
            run_plan(plan, source, ArraysSink(new, dest), workers=2)


def test_a_save_holds_a_few_parts_in_memory_not_the_rank_file():
    """ObjectSink streams each rank file out in parts: the Python memory a save allocates
    (tracemalloc: part buffers, copies for upload) stays within a few parts, far below the
    rank file (the sink used to assemble whole files: 8.4 MB here). The bytes sent are
    counted by the filesystem, against the file size computed from the layout."""
    import tracemalloc

    from fsspec.implementations.memory import MemoryFileSystem

    from scalai.models.synth import stored_nbytes

    sent: dict[str, int] = {}

    class Counting(MemoryFileSystem):  # keeps names and byte counts, drops the bytes
        protocol = "scalai-counting"

        def pipe_file(self, path, value, **kw):
            sent[path] = sent.get(path, 0) + len(value)
            super().pipe_file(path, bytes(value) if path.endswith(".json") else b"", **kw)

        def _open(self, path, mode="rb", **kw):
            if "w" not in mode:
                return super()._open(path, mode, **kw)
            fs = self

            class Sink:
                def write(self, data):
                    sent[path] = sent.get(path, 0) + len(data)

                def close(self):
                    MemoryFileSystem.pipe_file(fs, path, b"")
            return Sink()

    ptc = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")  # one rank file of ~3.9 MB
    arrays = local_raw(ptc, global_raw(ptc, seed=8))
    # one worker: on this backend parts go out in file order, so a second worker running
    # ahead of a slow one would make its parts wait (S3's multipart takes them in any order)
    part, workers, uploaders = 32 << 10, 1, 2
    plan = identity_plan(ptc, [0])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        sink = ObjectSink(f"memory://counting/{next(_ids)}", ptc, fs=Counting(), part_bytes=part, single_put_bytes=0,
                          upload_workers=uploaders)
        run_plan(plan, ArraysSource(ptc, arrays), sink, workers=workers)
        sink.commit()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    file_bytes = stored_nbytes(ptc)  # tensors only: the file adds its header
    (rank_file,) = [p for p in sent if p.endswith("rank-00000.safetensors")]
    assert file_bytes < sent[rank_file] < file_bytes + (64 << 10), "every byte of the file sent once"
    # parts being filled (one per worker, plus one a tensor may straddle) and parts queued
    # or uploading (3 per upload worker), plus 1 MiB for the plan runner's own bookkeeping
    bound = (workers + 1 + 3 * uploaders) * part + (1 << 20)
    assert bound * 2 < file_bytes
    assert peak < bound, f"a save held {peak} bytes, a bound of {bound} (rank file: {file_bytes})"


def test_a_checking_load_of_files_with_8_byte_headers_fetches_their_headers(memfs, monkeypatch):
    """Files written before the data section started at a page (headers padded to 8 bytes,
    as the official library pads them) differ in size from the layout scalai's writers
    give now: a checking load reads their headers instead of predicting them, and loads
    the same values."""
    from scalai.checkpoint import safetensors_io

    fs, prefix = memfs
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=9)
    with monkeypatch.context() as m:
        m.setattr(safetensors_io, "_ALIGN", 8)
        _save(fs, f"{prefix}/old", old, local_raw(old, glob))
    root = f"{prefix.split('://')[1]}/old"
    for r in range(2):
        data = fs.cat_file(f"{root}/rank-{r:05d}.safetensors")
        n = int.from_bytes(data[:8], "little")
        assert (8 + n) % 8 == 0 and (8 + n) % 4096 != 0, "written the old way"
    fetched = _checking_load(f"{prefix}/old", fs, old, new, local_raw(new, glob)[0], check_all=True)
    assert fetched > 0, "the headers were read, not predicted"


def test_a_checking_load_fetches_no_header_apart_and_the_checker_compares_it(memfs):
    """With others_checked (a load with verify), layouts come from the manifest: no header
    GET; the reader that checks a file compares its header bytes as they pass, and one that
    differs in a single byte (still valid JSON) is refused."""
    fs, prefix = memfs
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=7)
    _save(fs, f"{prefix}/h", old, local_raw(old, glob))
    want = local_raw(new, glob)[0]
    assert _checking_load(f"{prefix}/h", fs, old, new, want) == 0, "no header fetched apart"
    root = f"{prefix.split('://')[1]}/h"
    data = bytearray(fs.cat_file(f"{root}/rank-00001.safetensors"))
    n = int.from_bytes(data[:8], "little")
    assert data[8 + n - 1:8 + n] == b" "  # the header's padding
    data[8 + n - 1] = ord("\t")
    fs.pipe_file(f"{root}/rank-00001.safetensors", bytes(data))
    with pytest.raises(CheckpointError, match="rank-00001.safetensors is not laid out as its manifest says"):
        _checking_load(f"{prefix}/h", fs, old, new, want)
