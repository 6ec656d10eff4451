"""Sources and sinks of every declared kind through the one plan runner, and the
memory:// backend's guarantees. Expected values come from tests' own slicing of random
global tensors (test_checkpoint.global_raw/local_raw), never from the runner."""

from __future__ import annotations

import asyncio
import time
import zlib
from math import prod

import numpy as np
import pytest

from scalai.config import Placement
from scalai.dtypes import raw_numpy
from scalai.errors import CheckpointError, ChecksumError, PlanError
from scalai.models import model_ptc
from scalai.planner import Deployment, identity_plan, make_plan
from scalai.regions import flat_runs
from scalai.storage import (ArraySource, ArraysSink, ArraysSource, AsyncRangeSource, MemorySink, MemorySource,
                            RangeSource, TensorSink, run_plan)
from scalai.storage.checksum import ChecksumLedger
from scalai.storage.memory import delete_memory_checkpoint, memory_checkpoints
from scalai.storage.verify import verify_source
from test_checkpoint import global_raw, local_raw

GARBAGE = 0x5A

# Transitions whose plans hold every kind of window: contiguous spans, dim-1 splits
# (assembled by rows), flat ZeRO views (strided), vocabulary padding, a destination rank
# whose vocabulary shard is all padding (gpt-tiny at tp=4: no copy writes it).
CASES = [("llama-tiny", "tp=2,pp=1,dp=1", "tp=1,pp=1,dp=1"),
         ("gpt-tiny", "tp=1,pp=2,dp=2,zero=1", "tp=2,pp=1,dp=2,zero=1"),
         ("llama-tiny", "tp=4,pp=1,dp=1", "tp=2,pp=2,dp=1"),
         ("gpt-tiny", "tp=2,pp=1,dp=1", "tp=4,pp=2,dp=1")]


def _plan(old, new, hosts: int = 64, fanout: bool = True):
    place = Placement(hosts)
    return make_plan(Deployment(old, place), Deployment(new, place), fanout=fanout)


class Ranged(RangeSource):
    """Arrays in memory read as a ranged medium would be: copies out, small blocks."""

    block_bytes = 1000  # many blocks per copy, most not aligned to rows
    concurrency = 3

    def __init__(self, ptc, arrays, fail_after: int | None = None):
        self.ptc, self.state, self._src = ptc, {}, ArraysSource(ptc, arrays)
        self.reads, self.fail_after = 0, fail_after

    def read_into(self, rank, tensor, window, out):
        self.reads += 1
        if self.fail_after is not None:
            if self.reads == self.fail_after:
                raise OSError("connection reset by peer")
            time.sleep(0.001)  # a slow medium: reads queued behind the failure must not start
        np.copyto(out, window.select(self._src.array(rank, tensor)))


class AsyncRanged(AsyncRangeSource):
    block_bytes = 1500
    concurrency = 2

    def __init__(self, ptc, arrays):
        self.ptc, self.state, self._src = ptc, {}, ArraysSource(ptc, arrays)
        self.in_flight = self.most = 0

    async def read_into(self, rank, tensor, window, out):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0)
        np.copyto(out, window.select(self._src.array(rank, tensor)))
        self.in_flight -= 1


class Split(ArraySource):
    """Ranks 0..k-1 addressable, the others ranged: one source over two media."""

    def __init__(self, ptc, arrays, k):
        self.ptc, self.state, self.k = ptc, {}, k
        self._arrays, self._ranged = ArraysSource(ptc, arrays), Ranged(ptc, arrays)

    def array(self, rank, tensor):
        return self._arrays.array(rank, tensor)

    def part(self, rank):
        return self if rank < self.k else self._ranged


class BytesSink(TensorSink):
    """A sink without arrays (as an upload would be): contiguous writes only."""

    def __init__(self, ptc):
        self.ptc, self.data, self.crcs, self.completed = ptc, {}, {}, []
        self.sizes = {(r, n): int(np.prod(s.shape)) * raw_numpy(ptc.spec(n).dtype).itemsize
                      for r in range(ptc.config.world_size) for n, s in ptc.rank_shards(r)}

    def write(self, rank, tensor, byte_offset, data, crc=None):
        buf = self.data.setdefault((rank, tensor), bytearray(self.sizes[(rank, tensor)]))
        raw = memoryview(data).cast("B")
        assert crc is None or crc == zlib.crc32(raw)
        buf[byte_offset:byte_offset + raw.nbytes] = raw

    def complete(self, rank, tensor):
        self.completed.append((rank, tensor))

    def commit(self):
        pass

    def abort(self):
        self.data.clear()

    def array_of(self, rank, tensor, dtype):
        shape = dict(self.ptc.rank_shards(rank))[tensor].shape
        buf = self.data.get((rank, tensor), bytearray(self.sizes[(rank, tensor)]))
        return np.frombuffer(bytes(buf), dtype).reshape(shape)


def _expect_equal(got, expected):
    for r, tensors in expected.items():
        for name, want in tensors.items():
            have = got(r, name, want.dtype)
            assert have.shape == want.shape and np.array_equal(have, want), f"rank {r} tensor {name}"


@pytest.mark.parametrize("model, a, b", CASES)
@pytest.mark.parametrize("source_kind", ["arrays", "ranged", "batched", "async", "split"])
@pytest.mark.parametrize("sink_kind", ["arrays", "bytes"])
def test_every_source_kind_into_every_sink_kind(model, a, b, source_kind, sink_kind):
    old, new = model_ptc(model, a), model_ptc(model, b)
    glob = global_raw(old, seed=7)
    arrays = local_raw(old, glob, pad=GARBAGE)
    source = {"arrays": lambda: ArraysSource(old, arrays), "ranged": lambda: Ranged(old, arrays),
              "batched": lambda: Batched(old, arrays), "async": lambda: AsyncRanged(old, arrays),
              "split": lambda: Split(old, arrays, 1)}[source_kind]()
    expected = local_raw(new, glob, pad=0)
    plan = _plan(old, new, fanout=sink_kind == "arrays")
    if sink_kind == "arrays":
        dest = {r: {n: np.full(x.shape, 7, x.dtype) for n, x in t.items()} for r, t in expected.items()}
        report = run_plan(plan, source, ArraysSink(new, dest), workers=2)
        _expect_equal(lambda r, n, _: dest[r][n], expected)
    else:
        sink = BytesSink(new)
        report = run_plan(plan, source, sink, workers=2)
        _expect_equal(sink.array_of, expected)
        written = {(c.dst_rank, c.tensor) for c in plan.copies if c.dst.volume}
        assert sorted(sink.completed) == sorted(written), "each tensor completed exactly once"
    assert report.bytes == plan.stats.total_bytes
    if source_kind == "async":
        assert source.most == AsyncRanged.concurrency  # reads overlap, never beyond the source's limit


class Batched(Ranged):
    """A ranged source where a request costs more than its bytes; it records every
    read_many call: (rank, [(tensor, bytes)])."""

    coalesce = True

    def __init__(self, ptc, arrays):
        super().__init__(ptc, arrays)
        self.calls = []

    def read_many(self, rank, reads):
        self.calls.append((rank, [(tensor, out.nbytes) for tensor, _, out in reads]))
        super().read_many(rank, reads)


def test_small_blocks_of_one_rank_are_read_together_up_to_a_block():
    """A medium where a request costs more than its bytes gets the small blocks of one source
    rank in one call (at most ``block_bytes``), and what lands is still every window."""
    old, new = model_ptc("llama-tiny", "tp=2,pp=1,dp=1"), model_ptc("llama-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=4)
    source = Batched(old, local_raw(old, glob, pad=GARBAGE))
    sink = BytesSink(new)
    plan = _plan(old, new)
    run_plan(plan, source, sink, workers=2)
    _expect_equal(sink.array_of, local_raw(new, glob, pad=0))
    small = [(r, n) for r, reads in source.calls for n in reads if n[1] * 4 <= Ranged.block_bytes]
    assert small and all(sum(b for _, b in reads) <= Ranged.block_bytes for _, reads in source.calls)
    assert any(len(reads) > 1 for _, reads in source.calls), "small blocks share calls"
    copies = sum(1 for c in plan.copies if c.dst.volume)
    assert len(source.calls) < copies, "fewer calls than windows"


def test_host_fan_out_needs_a_sink_that_can_be_read_back():
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=4")
    plan = _plan(old, new, hosts=2)
    assert any(c.from_new for c in plan.copies)
    sink = BytesSink(new)
    with pytest.raises(PlanError, match="host fan-out.*fanout=False"):
        run_plan(plan, ArraysSource(old, local_raw(old, global_raw(old))), sink)
    assert sink.data == {}, "nothing is written when the plan does not fit the sink"


def test_a_failing_read_stops_the_run_and_propagates():
    old, new = model_ptc("llama-tiny", "tp=2,pp=1,dp=1"), model_ptc("llama-tiny", "tp=1,pp=1,dp=1")
    arrays = local_raw(old, global_raw(old))
    source = Ranged(old, arrays, fail_after=5)
    sink = BytesSink(new)
    with pytest.raises(OSError, match="connection reset"):
        run_plan(_plan(old, new), source, sink, workers=2)
    blocks = sum(-(-c.nbytes // Ranged.block_bytes) for c in _plan(old, new).copies)
    assert blocks > 1000 and source.reads < blocks // 4, "the blocks queued after the failure did not start"


@pytest.mark.parametrize("model, a, b", [("gpt-tiny", "tp=2,pp=1,dp=1", "tp=1,pp=1,dp=1"),
                                         ("llama-tiny", "tp=1,pp=2,dp=2", "tp=2,pp=1,dp=1")])
def test_whole_source_tensors_carry_their_crc_into_the_sink(model, a, b):
    """The rule lives in run_plan: the bytes of a copy that reads a whole source tensor keep
    the CRC the source records for it (combined when several fill one tensor), and so do
    those of a copy reading one run of more than half a source tensor (a vocabulary shard
    without its padding rows: its CRC derived from the recorded one); other bytes are
    checksummed from what is written. Recorded CRCs that are right give right CRCs;
    deliberately wrong ones show exactly which tensors were not checksummed again."""
    old, new = model_ptc(model, a), model_ptc(model, b)
    arrays = local_raw(old, global_raw(old, seed=3))
    true = {(r, n): zlib.crc32(np.ascontiguousarray(x)) for r, t in arrays.items() for n, x in t.items()}
    fake = {k: (v ^ 0x5A5A5A5A) for k, v in true.items()}
    place = Placement(64)
    plan = make_plan(Deployment(old, place), Deployment(new.stored_replicas(), place))
    old_shapes = {(r, n): s.shape for r in range(old.config.world_size) for n, s in old.rank_shards(r)}
    new_shapes = {(r, n): s.shape for r in range(new.config.world_size) for n, s in new.rank_shards(r)}
    runs, wholes = {}, {}
    for c in plan.copies:  # a whole source tensor into one contiguous run of the destination
        src_shape = old_shapes[(c.src_rank, c.tensor)]
        whole = c.src.view is None and len(flat_runs(src_shape, c.src.region)) == 1 \
            and 2 * c.src.region.volume > prod(src_shape)
        one_run = c.dst.view is None and len(flat_runs(new_shapes[(c.dst_rank, c.tensor)], c.dst.region)) == 1
        key = (c.dst_rank, c.tensor)
        runs[key] = runs.get(key, True) and one_run
        wholes[key] = wholes.get(key, False) or (whole and one_run)
    # a tensor written in contiguous runs only, one of them a whole source tensor: not re-read
    reused = {key: runs[key] and wholes[key] for key in runs}
    assert any(reused.values()) and not all(reused.values())
    for recorded, label in ((true, "right"), (fake, "wrong")):
        name = f"memory://test-crc-rule-{label}"
        sink = MemorySink(name, new)
        run_plan(plan, ArraysSource(old, arrays, checksums=recorded), sink)
        sink.commit()
        try:
            src = MemorySource(name)
            for (r, n), whole_copies in reused.items():
                actual = zlib.crc32(np.ascontiguousarray(src.array(r, n)))
                if label == "right" or not whole_copies:
                    assert src.checksum(r, n) == actual, (label, r, n)
                else:
                    assert src.checksum(r, n) != actual, (label, r, n)
        finally:
            delete_memory_checkpoint(name)


def test_memory_checkpoints_commit_atomically_and_never_change():
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=2")
    arrays = local_raw(ptc, global_raw(ptc, seed=1))
    name = "memory://test-commit"
    with pytest.raises(CheckpointError, match="no checkpoint memory://test-commit"):
        MemorySource(name)
    sink = MemorySink(name, ptc, {"step": 3})
    run_plan(identity_plan(ptc, range(4), stored=sink.stores), ArraysSource(ptc, arrays), sink)
    assert name[len("memory://"):] not in memory_checkpoints(), "invisible before the commit"
    sink.commit()
    try:
        with pytest.raises(FileExistsError, match="already exists"):
            MemorySink(name, ptc)
        src = MemorySource(name)
        assert src.state == {"step": 3}
        verify_source(src)
        for r in (0, 1):  # dp replicas (ranks r and r + 2) stored once, by one of them
            held = [n for n, _ in ptc.rank_shards(r)]
            assert sorted(src.stored(r) + src.stored(r + 2)) == sorted(held)
        for r in range(4):
            for n, _ in ptc.rank_shards(r):
                assert np.array_equal(src.read_window(r, n), arrays[r][n])
        with pytest.raises(ValueError, match="read-only"):
            src.array(0, ptc.names[0])[...] = 0
        aborted = MemorySink("memory://test-aborted", ptc)
        with aborted:
            aborted.prepare([0])
        assert "test-aborted" not in memory_checkpoints()
    finally:
        delete_memory_checkpoint(name)
    with pytest.raises(ValueError, match="empty or has spaces"):
        MemorySink("memory://a b", ptc)


def test_checksum_ledger():
    ledger = ChecksumLedger()
    data = np.arange(100, dtype=np.uint8)
    ledger.piece("a", 0, 60, zlib.crc32(data[:60]))
    ledger.piece("a", 60, 40, zlib.crc32(data[60:]))
    assert ledger.known("a", 100) == zlib.crc32(data)
    assert ledger.known("a", 120) == zlib.crc32(np.concatenate([data, np.zeros(20, np.uint8)]))
    ledger.piece("b", 0, 10, None)
    assert ledger.known("b", 10) is None
    ledger.declare("b", 7)
    assert ledger.known("b", 10) == 7
    ledger.piece("c", 0, 10, 1)
    ledger.unknown("c")
    assert ledger.known("c", 10) is None


def test_verify_streams_a_ranged_source_and_names_the_damage():
    ptc = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    arrays = local_raw(ptc, global_raw(ptc, seed=2))
    crcs = {(r, n): zlib.crc32(np.ascontiguousarray(a)) for r, t in arrays.items() for n, a in t.items()}

    class Recorded(Ranged):
        def checksum(self, rank, tensor):
            return crcs[(rank, tensor)]

    verify_source(Recorded(ptc, arrays))
    victim = ptc.names[3]
    arrays[1][victim].reshape(-1)[-1] ^= 1
    with pytest.raises(ChecksumError, match=f"rank 1, tensor {victim}: stored"):
        verify_source(Recorded(ptc, arrays))


def test_sources_and_sinks_must_be_declared():
    old = model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    plan = identity_plan(old, [0])
    arrays = local_raw(old, global_raw(old))
    with pytest.raises(TypeError, match="not a TensorSource"):
        run_plan(plan, arrays, ArraysSink(old, arrays))
    with pytest.raises(TypeError, match="not a TensorSink"):
        run_plan(plan, ArraysSource(old, arrays), arrays)
    other = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1")
    with pytest.raises(ValueError, match="plan was made for tp=1"):
        run_plan(plan, ArraysSource(other, arrays), ArraysSink(old, arrays))


class FakeDeviceTensor:
    """Stands for a tensor on an accelerator (no GPU here): what ArraysSink needs of one is
    its shape, dtype, device, and ``copy_`` from a host tensor."""

    def __init__(self, shape, dtype):
        import torch

        self.shape, self.dtype, self.device = torch.Size(shape), dtype, "cuda:0"
        self.value, self.copies = None, 0

    def copy_(self, host):
        self.value, self.copies = host.clone(), self.copies + 1


def test_device_tensors_fill_through_one_host_buffer_each():
    """A sink over tensors on a device stages each in host memory, copies it to the device
    once when the runner completes it, and frees the buffer; padding reads zero."""
    import torch

    from scalai.dtypes import torch_dtype

    old, new = model_ptc("llama-tiny", "tp=2,pp=1,dp=1"), model_ptc("llama-tiny", "tp=4,pp=1,dp=1")
    glob = global_raw(old, seed=11)
    live = {r: {n: FakeDeviceTensor(s.shape, torch_dtype(new.spec(n).dtype)) for n, s in new.rank_shards(r)}
            for r in range(4)}
    sink = ArraysSink(new, live)
    run_plan(_plan(old, new, fanout=False), ArraysSource(old, local_raw(old, glob, pad=GARBAGE)), sink, workers=2)
    sink.commit()  # refuses when a staged tensor was never completed
    expected = local_raw(new, glob, pad=0)
    for r, tensors in live.items():
        for n, t in tensors.items():
            assert t.copies == 1, (r, n)
            raw = t.value.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.value.element_size()])
            assert np.array_equal(raw.numpy().view(expected[r][n].dtype), expected[r][n]), (r, n)


@pytest.mark.parametrize("source_kind", ["arrays", "ranged"])
def test_live_tensors_that_are_strided_views_are_filled_in_place(source_kind):
    """Live tensors need not be contiguous (a transposed parameter, a slice of a bigger
    buffer): a sink over them copies into their strides, whatever the source."""
    old, new = model_ptc("gpt-tiny", "tp=2,pp=1,dp=1"), model_ptc("gpt-tiny", "tp=1,pp=1,dp=1")
    glob = global_raw(old, seed=12)
    arrays = local_raw(old, glob)
    expected = local_raw(new, glob)
    backing = {n: np.full((2,) + a.shape[::-1], 9, a.dtype) for n, a in expected[0].items()}
    live = {0: {n: b[1].T for n, b in backing.items()}}  # views with reversed strides
    assert not all(v.flags.c_contiguous for v in live[0].values() if v.ndim > 1)
    source = ArraysSource(old, arrays) if source_kind == "arrays" else Ranged(old, arrays)
    run_plan(_plan(old, new, fanout=False), source, ArraysSink(new, live), workers=2)
    for n, want in expected[0].items():
        assert np.array_equal(live[0][n], want), n
        assert (backing[n][0] == 9).all(), f"{n}: written outside the view"


def test_chain_moves_joins_tensors_consecutive_in_both_files_up_to_a_limit():
    """Moves join while each starts where the previous one ended in the same source file
    and in the same destination file, and the chain stays within the limit; anything else
    starts a new chain, and a move that joins nothing keeps its own task."""
    from scalai.storage.tasks import Move, Task, chain_moves

    def move(rank, name, fd, start, at, nbytes, checked=False):
        return Move(Task("arrays", rank, name, [], nbytes), fd, start, at, crc=None, checked=checked)

    moves = [move(0, "c", 3, 200, 1100, 50),  # given out of file order: sorted by (rank, at)
             move(0, "a", 3, 100, 1000, 60), move(0, "b", 3, 160, 1060, 40),
             move(0, "d", 3, 400, 1150, 10),  # source gap after c (250 != 400)
             move(0, "e", 4, 410, 1160, 10),  # another source file
             move(1, "f", 3, 420, 1170, 10),  # another destination rank
             move(0, "g", 4, 420, 1170, 10), move(0, "h", 4, 430, 1180, 10)]
    chains = chain_moves(moves, limit=1000)
    assert [[m.tensor for m in c.members] for c in chains] == [["a", "b", "c"], ["e", "g", "h"]]
    assert [(c.kind, c.rank, c.tensor, c.nbytes) for c in chains] == [("chain", 0, "a", 150), ("chain", 0, "e", 30)]
    assert [[m.start for m in c.piece] for c in chains] == [[100, 160, 200], [410, 420, 430]]
    # b is not after a in the source: a, b, c break apart
    broken = [move(0, "a", 3, 100, 1000, 60), move(0, "b", 3, 170, 1060, 40), move(0, "c", 3, 210, 1100, 50)]
    assert [[m.tensor for m in c.members] for c in chain_moves(broken)] == [["b", "c"]]
    # the limit: 60 + 40 fit in 100, c starts a chain of its own (and alone, no task)
    assert [[m.tensor for m in c.members] for c in chain_moves(moves[:3], limit=100)] == [["a", "b"]]
    # a checked move (read through the process) never joins one the kernel copies
    mixed = [move(0, "a", 3, 100, 1000, 60), move(0, "b", 3, 160, 1060, 40, checked=True),
             move(0, "c", 3, 200, 1100, 50), move(0, "d", 3, 250, 1150, 10, checked=True)]
    assert [[m.tensor for m in c.members] for c in chain_moves(mixed)] == []
    mixed[2] = move(0, "c", 3, 200, 1100, 50, checked=True)
    assert [[(m.task.tensor, m.checked) for m in c.piece] for c in chain_moves(mixed)] == [
        [("b", True), ("c", True), ("d", True)]]
