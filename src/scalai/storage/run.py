"""``run_plan``: the one runner of plans, from any :class:`TensorSource` into any :class:`TensorSink`.

Every plan of scalai runs here: a checkpoint reshard (files to files), a store's part of a
distributed transformation (its own mapped tensors and peers' ranged reads into new tensor
files), training load (saved tensors into live ones) and save (live tensors into files).

How:

1. The plan is checked against both layouts (every window fits its local tensor; sources
   and destinations are the plan's) and against the sink (it stores every destination; a
   host fan-out needs a sink it can read back). Nothing is written when that fails.
2. Copies are grouped into tasks (:mod:`scalai.storage.tasks`): one per destination tensor
   for copies from addressable sources (its copies are written together: streamed,
   assembled or copied in place, see :mod:`scalai.storage.filler`), one per block of at
   most ``block_bytes`` for copies from ranged sources (small blocks of one source rank
   packed into one ``read_many`` call up to that size), or, from
   a ``StreamingSource`` (an object store), one per piece the source plans for all the blocks of
   one source rank (a request streamed into the blocks it serves). Tasks run on a thread
   pool, largest first (so the last ones to finish are small ones; a sink that declares
   ``in_order`` gets them in its files' order instead), ``from_new`` copies (a host
   fan-out) after all others.
3. The rule for bytes that move unchanged lives here (``_source_crc``): a copy of a
   whole source tensor whose source records its CRC-32, into a contiguous range of a sink
   that records checksums, hands the sink that CRC instead of computing one (a tensor
   that moves whole keeps its CRC; one merged from whole tensors gets theirs combined); a
   copy of most of a tensor's bytes in one run (a vocabulary without its padding rows, the
   larger side of a ZeRO split) hands it the CRC derived from the recorded one and from
   those of the few bytes around the run, read instead of the run.
   When both sides are files (:class:`FileSource`, :class:`FileSink`) such a copy runs
   inside the kernel (``copy_file_range``: no page mapped, no byte through user space),
   and a destination tensor that is a whole source tensor unchanged (its copies, from one
   source rank, map every element to the same place) is offered to the sink as that file
   (``link_from``: a store links it, no byte copied; the report counts it in ``linked``).
   Every other block written to such a sink carries its CRC, computed while the block is
   in cache.
4. When a destination tensor's last task is done, ``sink.complete`` is called (write-back
   starts, a device copy is made) while other tensors are still being filled.

Memory bound: besides the sink's own (page cache, RAM it holds), one buffer of
:data:`~scalai.storage.blocks.CHUNK_BYTES` (or a ranged source's ``block_bytes``) per worker
(a streamed piece: the source's chunks in flight, and a buffer for each block it is filling
that cannot land in the sink's memory directly);
a sink without arrays also gets each tensor whose windows are too strided to cut by rows
assembled whole once (see :meth:`Filler.staged`).

Asynchronous sources (:class:`AsyncRangeSource`, a peer store) are awaited on an event loop:
:func:`run_plan_async` inside a running loop (a store's server), or :func:`run_plan`, which
starts one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from math import prod
from typing import Callable

import numpy as np

from ..dtypes import itemsize
from ..errors import PlanError
from ..planner.plan import Copy, Plan, Window
from ..regions import gaps
from . import blocks as _blocks
from .base import (ArraySink, ArraySource, AsyncRangeSource, FileSink, FileSource, PackedFileSink, TensorSink,
                   TensorSource, same_tensors)
from .blocks import select, split_window, window_span
from .checksum import crc32, crc32_of_range
from .filler import PARTS, Clock, Filler, Write
from .pieces import CrcCheck
from .tasks import Dealer, Dest, Move, Task, chain_moves, default_workers, group, order_phase, uncovered
from .verify import verify_source

__all__ = ["run_plan", "run_plan_async", "RunReport", "default_workers"]


@dataclass(frozen=True)
class RunReport:
    """What a run did.

    Attributes:
        bytes: bytes the copies put into the sink (their ``nbytes``), ``linked`` included.
        copies: copies run.
        tensors: destination tensors written.
        workers: threads used.
        seconds: ``total`` (wall time of the run), ``prepare`` (its first part, before any
            copy: checking and grouping the plan, the sink's ``prepare``, zeroing padding)
            and each of :data:`~scalai.storage.filler.PARTS` (seconds summed over the worker
            threads: with ``workers`` threads they add up to at most ``workers x total``).
        linked: of ``bytes``, those of destination tensors that the sink made links to
            their unchanged source files (:meth:`FileSink.link_from`): not copied.
    """

    bytes: int
    copies: int
    tensors: int
    workers: int
    seconds: dict[str, float] = field(default_factory=dict)
    linked: int = 0

    def parts(self) -> str:
        """``read 0.00 · copy 0.12 · ...`` for a report line (parts that took any time)."""
        return " · ".join(f"{p} {self.seconds[p]:.2f}" for p in PARTS if self.seconds.get(p))


@dataclass
class _ByteRun:
    """A run of copies into one destination tensor that read consecutive elements of one
    source tensor (``local``, C-contiguous) into consecutive elements of the destination:
    ``size`` elements from element ``at`` of the source to element ``span`` of the
    destination. Adjacent copies (a fused QKV's head groups, rows of a ZeRO range) merge
    into one run: one kernel copy, one CRC rule."""

    src_rank: int
    local: np.ndarray
    at: int
    span: int
    size: int

    def follows(self, src_rank: int, at: int, span: int) -> bool:
        """Whether a copy from ``src_rank``'s element ``at`` to element ``span`` continues this run."""
        return src_rank == self.src_rank and at == self.at + self.size and span == self.span + self.size


class _Run:
    def __init__(self, plan: Plan, source: TensorSource, sink: TensorSink, workers: int | None,
                 progress: Callable[[int], None] | None, verify: bool = False):
        if not isinstance(source, TensorSource):
            raise TypeError(f"source {source!r} is not a TensorSource; wrap arrays in ArraysSource, open "
                            f"checkpoints with Checkpoint.open")
        if not isinstance(sink, TensorSink):
            raise TypeError(f"sink {sink!r} is not a TensorSink; wrap arrays in ArraysSink, write "
                            f"checkpoints with CheckpointWriter")
        for obj, ptc, side in ((source, plan.old.ptc, "source"), (sink, plan.new.ptc, "destination")):
            if not same_tensors(obj.ptc, ptc):
                raise ValueError(f"the {side} holds layout {obj.ptc.config} of its tensors, the plan was "
                                 f"made for {ptc.config} (or for other tensors); plan from the {side}'s "
                                 f"own layout")
        self.plan, self.source, self.sink = plan, source, sink
        self.checksum = sink.records_checksums
        self.arrays = isinstance(sink, ArraySink)
        self.files = isinstance(sink, FileSink)  # kernel copies file to file (until one is refused)
        self.linked = 0  # bytes of destination tensors linked to their source files
        if not sink.zero_filled and not self.arrays:
            raise TypeError(f"{type(sink).__name__} is neither zero_filled nor an ArraySink; the runner "
                            f"cannot zero the elements no copy writes")
        grouping = group(plan, source, sink)
        self.windows, self.dests, self.phases, self.parts = (grouping.windows, grouping.dests, grouping.phases,
                                                             grouping.parts)
        self.copies, self.bytes = grouping.copies, grouping.bytes
        self.workers = workers or default_workers()
        ranged_parts = [p for p in self.parts.values() if not isinstance(p, ArraySource)]
        if ranged_parts:
            self.workers = max(self.workers, max(p.concurrency for p in ranged_parts))
        self.is_async = any(isinstance(p, AsyncRangeSource) for p in ranged_parts)
        self._lock = threading.Lock()
        self._progress = progress
        self._local = threading.local()
        self._fillers: list[Filler] = []
        self._read_seconds = 0.0  # awaited reads (summed over concurrent reads)
        self.prepare_seconds = 0.0  # checking the plan, grouping it, preparing the sink
        self._sems: dict[int, asyncio.Semaphore] = {}  # per asynchronous part: reads in flight
        # source tensors checked as their bytes pass (the rest: verify_source alongside)
        self.passing: dict[tuple[int, str], list[tuple[int, int]]] = {}
        self._expect: dict[tuple[int, str], tuple[int, int]] = {}  # key -> (recorded CRC-32, bytes)
        self._old_arrays: dict[tuple[int, str], np.ndarray] = {}  # (old rank, tensor) -> its array
        self._old_shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # old rank -> its tensors' local shapes
        self._moves: dict[int, tuple[FileSource, int] | None] = {}  # id(task) -> _whole_move(task)
        if verify:
            self._read_whole()
        self.crcs = CrcCheck(self._expect.__getitem__, lambda key: source.where(key[0]))

    def _assembled(self, dest: Dest, copies: list[Copy], spans: list[int | None]) -> bool:
        """Whether a destination tensor of a sink without arrays is built by rows
        (:meth:`Filler.assemble`): some window is strided in it, and rows fit the buffer."""
        return None in spans and not dest.mixed and all(c.dst.view is None for c in copies) \
            and prod(dest.shape[1:]) * dest.dtype.itemsize <= _blocks.CHUNK_BYTES

    def _read_whole(self) -> None:
        """Finds the source tensors ``(rank, name)`` with a recorded CRC-32 that this run
        reads as they are, contiguous byte ranges passing through this process
        (:meth:`_arrays`' runs, and the row blocks it assembles from whole source rows),
        covering at least half of their bytes: their CRC-32s are recomputed from those
        ranges as they pass, plus the ``(offset, nbytes)`` gaps kept for each in
        :attr:`passing` (vocabulary padding rows, which no copy reads), read at
        :meth:`start`. Checking the source then costs no read of its own for them."""
        pieces: dict[tuple[int, str], set[tuple[int, int]]] = defaultdict(set)
        if self.arrays and not self.checksum:  # memory to memory: strided copies, no runs
            return
        layout = self._source_layout
        for task in self.phases[0]:
            if task.kind != "arrays":
                continue
            moved = self._whole_move(task)
            if moved is not None:  # one whole source tensor, read as one run
                pieces[(self.source.stored_in(moved[1], task.tensor), task.tensor)].add((0, task.nbytes))
                continue
            dest = self.dests[(task.rank, task.tensor)]
            spans = [window_span(dest.shape, c.dst) for c in task.copies]
            assembled = self._assembled(dest, task.copies, spans)
            for c, span in zip(task.copies, spans):
                part = self.parts.get(c.src_rank)
                if (span is None and not assembled) or c.from_new or not isinstance(part, ArraySource):
                    continue
                shape, size = layout(c.src_rank, c.tensor)
                at = None if shape is None else window_span(shape, c.src)
                if at is not None:
                    pieces[(self.source.stored_in(c.src_rank, c.tensor), c.tensor)].add((at * size, c.nbytes))
        for key, found in pieces.items():
            shape, size = layout(*key)
            total = prod(shape) * size
            holes = gaps(((o, o + n) for o, n in found), total)
            unread = sum(b - a for a, b in holes)
            overlap = sum(n for _, n in found) > total - unread  # left to the check alongside
            crc = self.source.checksum(*key)
            if not overlap and 2 * unread <= total and crc is not None:
                self.passing[key] = [(a, b - a) for a, b in holes]
                self._expect[key] = (crc, total)

    def _part(self, rank: int) -> TensorSource:
        """The source part that reads old rank ``rank`` (also one that no copy reads: the
        owner of a replica the check reads where it is stored)."""
        return self.parts[rank] if rank in self.parts else self.source.part(rank)

    def _source_layout(self, rank: int, tensor: str) -> tuple[tuple[int, ...] | None, int]:
        """``(local shape, bytes per element)`` of old rank ``rank``'s ``tensor`` as one
        C-contiguous run of bytes; the shape ``None`` where its array is strided. A file's
        tensors always are runs: their shapes come from the plan's layout (which the source
        was checked to hold), no array is made."""
        if isinstance(self._part(rank), FileSource):
            shapes = self._old_shapes.get(rank)
            if shapes is None:
                shapes = self._old_shapes[rank] = {n: s.shape for n, s in self.plan.old.ptc.rank_shards(rank)}
            return shapes[tensor], itemsize(self.plan.old.ptc.spec(tensor).dtype)
        local = self._source_array(rank, tensor)
        return (local.shape if local.flags.c_contiguous else None), local.itemsize

    def _source_array(self, rank: int, tensor: str) -> np.ndarray:
        """Old rank ``rank``'s ``tensor`` from its part (:meth:`_part`), asked for once per
        run (a tensor's copies, and the check's gaps, ask for it in turn)."""
        local = self._old_arrays.get((rank, tensor))
        if local is None:
            local = self._old_arrays[(rank, tensor)] = self._part(rank).array(rank, tensor)
        return local

    def release(self) -> None:
        """Drop the source arrays this run holds, so that the source can unmap its files
        when it closes (a view kept alive would keep its mapping past the close)."""
        self._old_arrays.clear()

    def _check_gaps(self) -> None:
        """The CRC-32 of the bytes of each checked source tensor that no copy reads."""
        clock = self.filler().clock
        t0 = time.perf_counter()
        for key, holes in self.passing.items():
            flat = self._source_array(*key).reshape(-1).view(np.uint8)
            for offset, nbytes in holes:
                self.crcs.add(key, offset, nbytes, crc32(flat[offset:offset + nbytes]))
        clock.checksum += time.perf_counter() - t0

    def _passed(self, key: tuple[int, str], local: np.ndarray) -> Callable[[np.ndarray], None]:
        """For a checked source tensor: records the CRC-32 of a contiguous block of
        ``local``'s bytes that passed (its offset from where the block lies in memory)."""
        base = local.__array_interface__["data"][0]
        clock = self.filler().clock

        def passed(block: np.ndarray) -> None:
            t0 = time.perf_counter()
            crc = crc32(block)
            clock.checksum += time.perf_counter() - t0
            self.crcs.add(key, block.__array_interface__["data"][0] - base, block.nbytes, crc)

        return passed

    # -- bookkeeping --------------------------------------------------------------------
    def tick(self, nbytes: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(nbytes)

    def filler(self) -> Filler:
        f = getattr(self._local, "filler", None)
        if f is None:
            f = self._local.filler = Filler(self.tick, Clock())
            with self._lock:
                self._fillers.append(f)
        return f

    def done(self, key: tuple[int, str]) -> None:
        with self._lock:
            dest = self.dests[key]
            dest.pending -= 1
            last = dest.pending == 0
        if last:
            clock = self.filler().clock
            t0 = time.perf_counter()
            self.sink.complete(*key)
            clock.complete += time.perf_counter() - t0

    def start(self) -> None:
        """Prepare the sink; in a sink that is not zero-filled, zero what no copy writes
        (padding inside copied tensors, and tensors that are all padding: a tensor-parallel
        rank's shard of padded vocabulary rows, which no copy touches)."""
        ranks = sorted({rank for rank, _ in self.windows})
        self._check_gaps()
        self.sink.prepare(ranks)
        self._chain()
        if self.sink.zero_filled:
            return
        for rank in ranks:
            for name, shard in self.plan.new.ptc.rank_shards(rank):
                if not shard.pieces and (rank, name) not in self.windows and self.sink.stores(rank, name):
                    self.sink.array(rank, name)[...] = 0
                    self.sink.complete(rank, name)
        for key, windows in self.windows.items():
            local = self.sink.array(*key)
            if sum(w.volume for w in windows) >= local.size:
                continue
            padding = uncovered(local.shape, windows)
            if padding is None:
                local[...] = 0
            for box in padding or ():
                local[box.to_slices() + (...,)] = 0
            if key not in self.dests:  # nothing else will write it
                self.sink.complete(*key)

    def report(self, total: float) -> RunReport:
        seconds = {"total": total, "prepare": self.prepare_seconds}
        for p in PARTS:
            seconds[p] = sum(getattr(f.clock, p) for f in self._fillers)
        seconds["read"] += self._read_seconds
        return RunReport(self.bytes, self.copies, len(self.dests), self.workers, seconds, self.linked)

    # -- tasks --------------------------------------------------------------------------
    def run_task(self, task: Task) -> None:
        if task.kind == "staged":
            self._staged(task)  # calls done() itself
            return
        if task.kind == "batch":
            self._batch(task)  # calls done() itself, per member
            return
        if task.kind == "stream":
            self._stream(task)  # calls done() itself, per member
            return
        if task.kind == "chain":
            self._chained(task)  # calls done() itself, per member
            return
        if task.kind == "block":
            self._ranged(task)
        else:
            self._arrays(task)
        self.done((task.rank, task.tensor))

    def _arrays(self, task: Task) -> None:
        """Every copy into one tensor, from addressable arrays (a source, or the sink)."""
        rank, tensor, copies = task.rank, task.tensor, task.copies
        if not self.passing and self._link(task):  # checking the source reads its bytes anyway
            return
        dest, sink, filler = self.dests[(rank, tensor)], self.sink, self.filler()
        selected = []
        for c in copies:
            local = sink.written(c.src_rank, tensor) if c.from_new else self._source_array(c.src_rank, tensor)
            if local.dtype.itemsize != dest.dtype.itemsize:
                raise PlanError(f"{tensor}: source and destination element sizes differ")
            selected.append((c, select(c.src, local), local))
        if self.arrays and not self.checksum:  # memory to memory: one copy per window, no blocks
            target = sink.array(rank, tensor)
            for c, s, _ in selected:
                filler.strided(select(c.dst, target), s)
            return
        write = partial(sink.write, rank, tensor)
        spans = [window_span(dest.shape, c.dst) for c, _, _ in selected]
        if self._assembled(dest, copies, spans):
            keys = [None if c.from_new or not self.passing else (self.source.stored_in(c.src_rank, tensor), tensor)
                    for c, _, _ in selected]
            passed = [self._passed(key, local) if key in self.passing else None
                      for key, (_, _, local) in zip(keys, selected)]
            filler.assemble(dest.shape, dest.dtype, [(c.dst.region, s) for c, s, _ in selected], write, self.checksum,
                            passed)
            return
        target, runs = None, []
        for (c, s, local), span in zip(selected, spans):
            if span is None:
                if target is None:
                    target = sink.array(rank, tensor)
                filler.strided(select(c.dst, target), s)
                continue
            at = None if c.from_new or not local.flags.c_contiguous else window_span(local.shape, c.src)
            if at is None:
                filler.stream(s, write, span * dest.dtype.itemsize, self.checksum)
            elif runs and runs[-1].follows(c.src_rank, at, span):
                runs[-1].size += s.size
            else:
                runs.append(_ByteRun(c.src_rank, local, at, span, s.size))
        for run in runs:
            data = run.local.reshape(-1)[run.at:run.at + run.size]
            offset = run.span * dest.dtype.itemsize
            key = (self.source.stored_in(run.src_rank, tensor), tensor) if self.passing else None
            if key in self.passing:  # through user space: checked on the way
                crc = self._pass_through(run, tensor, data, write, offset)
                self.crcs.add(key, run.at * data.itemsize, data.nbytes, crc)
                continue
            crc = self._source_crc(run, tensor)
            if crc is None:
                filler.stream(data, write, offset, self.checksum)
            elif not self._kernel_copy(run, rank, tensor, offset, crc):
                filler.stream(data, write, offset, crc)

    def _pass_through(self, run: _ByteRun, tensor: str, data: np.ndarray, write: Write, offset: int) -> int:
        """Write a run (``data``: its elements in the source's array) whose source bytes the
        check reads on the way; returns their CRC-32. From a file: read into the worker's
        buffer (:meth:`Filler.stream_file`: no page faults, nothing mapped to drop at the
        end); else straight from ``data``."""
        part = self.parts[run.src_rank]
        if isinstance(part, FileSource):
            fd, start = part.file_range(run.src_rank, tensor)
            [crc] = self.filler().stream_file(fd, start + run.at * data.itemsize, [data.nbytes],
                                              lambda _, at, block, crc: write(offset + at, block, crc))
            return crc
        return self.filler().stream(data, write, offset, True)

    def _source_crc(self, run: _ByteRun, tensor: str) -> int | None:
        """The rule for bytes that move unchanged, in one place: a run of a source tensor's
        bytes, written as one run of the destination's, whose source records the tensor's
        CRC-32, hands the sink the CRC of the bytes it writes without reading them. A whole
        tensor's is the recorded one; a run's is derived from it and from the CRCs of the
        bytes around the run (:func:`~scalai.storage.checksum.crc32_of_range`), read here
        when they are fewer than the run's (a vocabulary without its padding rows, the
        larger side of a ZeRO split). A tensor filled by such runs keeps its source's CRC,
        or gets theirs combined; nothing is read twice. ``None``: the bytes are checksummed
        as they are written."""
        if not self.checksum:
            return None
        local = run.local
        whole = self.parts[run.src_rank].checksum(run.src_rank, tensor)
        if whole is None or run.size == local.size:
            return whole
        if 2 * run.size <= local.size:
            return None
        flat = local.reshape(-1)
        head, tail = flat[:run.at], flat[run.at + run.size:]
        clock = self.filler().clock
        t0 = time.perf_counter()
        crc = crc32_of_range(whole, crc32(head), run.size * local.itemsize, crc32(tail), tail.nbytes)
        clock.checksum += time.perf_counter() - t0
        return crc

    def _link(self, task: Task) -> bool:
        """A destination tensor that is one source tensor unchanged, both files: offered to
        a sink that links (:attr:`FileSink.links`) as that very file
        (:meth:`FileSink.link_from`, which checks dtype, shape and CRC in its own format).
        Its copies all read one source rank, each window the same box on both sides, no
        view, together every element; the source records a CRC. False (the copies then run)
        where any of that fails or the sink declines."""
        if not (isinstance(self.sink, FileSink) and self.sink.links):
            return False
        moved = self._whole_move(task)
        if moved is None:
            return False
        part, src_rank = moved
        crc = part.checksum(src_rank, task.tensor)
        path = part.file_path(src_rank, task.tensor)
        if crc is None or path is None:
            return False
        dest = self.dests[(task.rank, task.tensor)]
        nbytes = prod(dest.shape) * dest.dtype.itemsize
        fd, start = part.file_range(src_rank, task.tensor)
        clock = self.filler().clock
        t0 = time.perf_counter()
        done = self.sink.link_from(task.rank, task.tensor, path, fd, start, nbytes, crc)
        clock.write += time.perf_counter() - t0
        if done:
            with self._lock:
                self.linked += nbytes
            self.tick(nbytes)
        return done

    def _whole_move(self, task: Task) -> tuple[FileSource, int] | None:
        """``(part, old rank)`` when ``task`` (``arrays``) writes its destination tensor as the
        bytes of one whole source tensor of a file, unchanged and in their order: the same
        box on both sides, or a flat ZeRO piece holding the whole of a parameter's state.
        Its copies all read one source rank, each one contiguous run at the same element
        offset on both sides, together every element of both. ``None`` otherwise.
        Worked out once per task (the check's look-ahead, the chains and links ask)."""
        if task.kind != "arrays":
            return None
        known = self._moves.get(id(task), False)
        if known is False:
            known = self._moves[id(task)] = self._find_whole_move(task)
        return known

    def _find_whole_move(self, task: Task) -> tuple[FileSource, int] | None:
        first = task.copies[0]
        part = self.parts.get(first.src_rank)
        dest = self.dests[(task.rank, task.tensor)]
        if not isinstance(part, FileSource) or dest.mixed or any(
                c.from_new or c.src_rank != first.src_rank for c in task.copies):
            return None
        src_shape, _ = self._source_layout(first.src_rank, task.tensor)
        size = prod(dest.shape)
        if prod(src_shape) != size:  # the source holds more (padding) or less
            return None
        runs = []
        for c in task.copies:
            at = window_span(src_shape, c.src)
            if at is None or at != window_span(dest.shape, c.dst):
                return None
            runs.append((at, c.src.volume))
        end = 0
        for at, n in sorted(runs):  # the runs tile the tensor
            if at != end:
                return None
            end += n
        return (part, first.src_rank) if end == size else None

    def _chain(self) -> None:
        """Join the tasks of whole tensors that move unchanged file to file and lie one
        after the other in both files (consecutive layers' tensors, a pipeline stage's
        share of a file) into ``chain`` tasks (:func:`~.tasks.chain_moves`): one kernel
        copy each instead of one per tensor (a model's biases and norms are many tensors
        of a few KiB each), or, for tensors the check reads as they pass (``verify``), one
        stream of 4 MiB reads cut at the tensors' ends. Not where the source records no
        CRC for a sink that records checksums."""
        if not (self.files and isinstance(self.sink, PackedFileSink)):
            return
        moves = []
        for task in self.phases[0]:
            moved = self._whole_move(task)
            if moved is None:
                continue
            part, src_rank = moved
            checked = (self.source.stored_in(src_rank, task.tensor), task.tensor) in self.passing
            crc = part.checksum(src_rank, task.tensor) if self.checksum else None
            if self.checksum and crc is None and not checked:
                continue
            fd, start = part.file_range(src_rank, task.tensor)
            moves.append(Move(task, fd, start, self.sink.start_of(task.rank, task.tensor), crc, checked))
        chains = chain_moves(moves)
        if chains:
            joined = {id(t) for chain in chains for t in chain.members}
            self.phases[0][:] = [t for t in self.phases[0] if id(t) not in joined] + chains
            order_phase(self.phases[0], self.plan, self.sink)

    def _chained(self, task: Task) -> None:
        """A ``chain`` task: its tensors in one kernel copy, or one by one where the kernel
        cannot copy between these files; checked tensors read through the worker's buffer."""
        moves: list[Move] = task.piece
        if moves[0].checked:
            self._chained_through(task)
            return
        clock = self.filler().clock
        t0 = time.perf_counter()
        done = self.files and self.sink.copy_tensors(task.rank, [(m.task.tensor, m.crc) for m in moves],
                                                      moves[0].fd, moves[0].start)
        clock.write += time.perf_counter() - t0
        if done:
            self.tick(task.nbytes)
        else:
            self.files = False
        for member in task.members:
            if not done:
                self._arrays(member)
            self.done((member.rank, member.tensor))

    def _chained_through(self, task: Task) -> None:
        """A ``chain`` task of tensors the source check reads as they pass: their bytes read
        from the source file block by block (:meth:`Filler.stream_file`), each tensor's
        share of a block written with its CRC-32, each tensor's CRC-32 counted for the check."""
        moves: list[Move] = task.piece
        names = [m.task.tensor for m in moves]
        write = self.sink.write
        crcs = self.filler().stream_file(moves[0].fd, moves[0].start, [m.task.nbytes for m in moves],
                                         lambda i, offset, block, crc: write(task.rank, names[i], offset, block, crc))
        for m, crc in zip(moves, crcs):
            src_rank = m.task.copies[0].src_rank
            self.crcs.add((self.source.stored_in(src_rank, m.task.tensor), m.task.tensor), 0, m.task.nbytes, crc)
            self.done((m.task.rank, m.task.tensor))

    def _kernel_copy(self, run: _ByteRun, rank: int, tensor: str, offset: int, crc: int) -> bool:
        """Copy a run of a source tensor's bytes file to file inside the kernel (no page of
        either file mapped here, no byte through user space) when both sides are files;
        False if not."""
        part = self.parts[run.src_rank]
        nbytes = run.size * run.local.itemsize
        if not (self.files and isinstance(part, FileSource)) or not nbytes:
            return False
        fd, start = part.file_range(run.src_rank, tensor)
        clock = self.filler().clock
        t0 = time.perf_counter()
        done = self.sink.copy_from(rank, tensor, offset, fd, start + run.at * run.local.itemsize, nbytes, crc)
        clock.write += time.perf_counter() - t0
        if not done:
            self.files = False  # e.g. across filesystems: the runner writes from mappings instead
            return False
        self.tick(nbytes)
        return True

    def _read(self, part: TensorSource, c: Copy, window: Window, out: np.ndarray) -> None:
        """A blocking read on a worker thread (never an asynchronous part's: a worker that
        waited for the event loop could starve the reads that the loop waits to store)."""
        clock = self.filler().clock
        t0 = time.perf_counter()
        part.read_into(c.src_rank, c.tensor, window, out)
        clock.read += time.perf_counter() - t0

    def _ranged(self, task: Task) -> None:
        """One block of a copy from a ranged source (blocking reads, on a worker thread)."""
        src_w, dst_w = task.block
        dest, filler = self.dests[(task.rank, task.tensor)], self.filler()
        buf = self._direct(task, dst_w)
        if buf is not None:
            self._read(task.part, task.copies[0], src_w, buf)
            filler.progress(buf.nbytes)
            return
        buf = filler.buffer(task.nbytes, dest.dtype, dst_w.shape)
        self._read(task.part, task.copies[0], src_w, buf)
        self._store_block(task, dst_w, buf)

    def _batch(self, task: Task) -> None:
        """Small blocks of one source rank: read with one ``read_many`` call (into the
        sink's memory where :meth:`_direct` allows, else into the worker's buffer, cut in
        8-byte aligned pieces: at most ``block_bytes`` and a few bytes), then stored one
        by one."""
        filler = self.filler()
        direct = [self._direct(m, m.block[1]) for m in task.members]
        sizes = [0 if d is not None else -(-m.nbytes // 8) * 8 for m, d in zip(task.members, direct)]
        base = filler.buffer(sum(sizes), np.dtype(np.uint8), (sum(sizes),))
        reads, landed, at = [], [], 0
        for m, buf, size in zip(task.members, direct, sizes):
            src_w, dst_w = m.block
            landed.append(buf is not None)
            if buf is None:
                dtype = self.dests[(m.rank, m.tensor)].dtype
                buf = base[at:at + m.nbytes].view(dtype).reshape(dst_w.shape)
                at += size
            reads.append((m.tensor, src_w, buf))
        t0 = time.perf_counter()
        task.part.read_many(task.copies[0].src_rank, reads)
        filler.clock.read += time.perf_counter() - t0
        for m, (_, _, buf), direct in zip(task.members, reads, landed):
            if direct:
                filler.progress(buf.nbytes)
            else:
                self._store_block(m, m.block[1], buf)
            self.done((m.rank, m.tensor))

    def _stream(self, task: Task) -> None:
        """One piece of a streaming source: its blocks' bytes arrive in file order, each
        into the sink's memory where :meth:`_direct` allows, else into a buffer of its
        own (allocated at its first byte, stored and dropped at its last)."""
        filler = self.filler()
        members = dict(zip(task.piece.reads, task.members))
        staged: dict[int, np.ndarray] = {}

        def out(i: int) -> np.ndarray:
            m = members[i]
            direct = self._direct(m, m.block[1])
            if direct is not None:
                return direct.reshape(-1).view(np.uint8)
            buf = staged[i] = np.empty(m.nbytes, np.uint8)
            return buf

        def done(i: int) -> None:
            m = members[i]
            buf = staged.pop(i, None)
            if buf is None:
                filler.progress(m.nbytes)
            else:
                self._store_block(m, m.block[1], buf.view(self.dests[(m.rank, m.tensor)].dtype).reshape(
                    m.block[1].shape))
            self.done((m.rank, m.tensor))

        t0 = time.perf_counter()
        task.part.read_piece(task.piece, out, done)
        filler.clock.read += time.perf_counter() - t0

    def _direct(self, task: Task, dst_w: Window) -> np.ndarray | None:
        """The sink's own memory for a block, when a ranged read can land there directly
        (an array sink that keeps no checksums, a contiguous selection); else None."""
        if not self.arrays or self.checksum:
            return None
        target = select(dst_w, self.sink.array(task.rank, task.tensor))
        return target if target.flags.c_contiguous else None

    def _store_block(self, task: Task, dst_w: Window, buf: np.ndarray) -> None:
        """A block read from a ranged source into the sink: one write with its CRC where its
        window is a contiguous run (a sink that keeps checksums, or one without arrays),
        else a copy into the sink's array (any strides: live tensors may be views)."""
        dest, filler = self.dests[(task.rank, task.tensor)], self.filler()
        span = window_span(dest.shape, dst_w)
        if span is not None and (self.checksum or not self.arrays):
            filler.put(partial(self.sink.write, task.rank, task.tensor), span * dest.dtype.itemsize,
                       buf, self.checksum)
        else:
            filler.strided(select(dst_w, self.sink.array(task.rank, task.tensor)), buf)

    def _staged(self, task: Task) -> None:
        """A tensor of a sink without arrays whose windows are too strided to write by
        rows: assembled whole in a buffer (uncovered elements zero), written once."""
        whole = self._whole(task)
        for c in task.copies:
            self._stage(c, whole)
        self._put_whole(task, whole)

    def _whole(self, task: Task) -> np.ndarray:
        dest = self.dests[(task.rank, task.tensor)]
        return np.zeros(dest.shape, dest.dtype)

    def _stage(self, c: Copy, whole: np.ndarray) -> None:
        """One copy into a staged tensor, from an addressable or a blocking ranged part."""
        filler, part = self.filler(), self.parts[c.src_rank]
        if isinstance(part, ArraySource):
            filler.strided(select(c.dst, whole), select(c.src, part.array(c.src_rank, c.tensor)))
            return
        for sw, dw in split_window(c.src, c.dst, whole.itemsize, part.block_bytes):
            buf = filler.buffer(dw.volume * whole.itemsize, whole.dtype, dw.shape)
            self._read(part, c, sw, buf)
            filler.strided(select(dw, whole), buf)

    def _put_whole(self, task: Task, whole: np.ndarray) -> None:
        self.filler().put(partial(self.sink.write, task.rank, task.tensor), 0, whole, self.checksum, copied=0)
        self.done((task.rank, task.tensor))

    async def _staged_async(self, task: Task, pool: Executor) -> None:
        """:meth:`_staged` with asynchronous parts: their reads are awaited here, the rest
        runs on the pool."""
        loop = asyncio.get_running_loop()
        whole = self._whole(task)
        for c in task.copies:
            part = self.parts[c.src_rank]
            if not isinstance(part, AsyncRangeSource):
                await loop.run_in_executor(pool, self._stage, c, whole)
                continue
            for sw, dw in split_window(c.src, c.dst, whole.itemsize, part.block_bytes):
                buf = np.empty(dw.shape, whole.dtype)
                async with self._sems[id(part)]:
                    t0 = time.perf_counter()
                    await part.read_into(c.src_rank, c.tensor, sw, buf)
                    self._read_seconds += time.perf_counter() - t0
                np.copyto(select(dw, whole), buf)
        await loop.run_in_executor(pool, self._put_whole, task, whole)

    # -- drivers ------------------------------------------------------------------------
    def run_threads(self, pool: Executor) -> None:
        """Every task on the pool's threads, each thread keeping to the destination files
        dealt to it, then helping where no other thread writes (:class:`~.tasks.Dealer`);
        after a failure no task starts, the running ones end, and the first error is raised."""
        for phase in self.phases:  # from_new copies read what the first phase wrote
            n = min(self.workers, len(phase))
            dealer, failed = Dealer(phase, n, self.sink.in_order), []

            def worker(i: int) -> None:
                while not failed:
                    task = dealer.next(i)
                    if task is None:
                        return
                    try:
                        self.run_task(task)
                    except BaseException as exc:  # noqa: BLE001 - raised below, in the caller
                        failed.append(exc)

            wait([pool.submit(worker, i) for i in range(n)])
            if failed:
                raise failed[0]

    async def run_async(self, pool: Executor) -> None:
        loop = asyncio.get_running_loop()
        sems = self._sems = {id(p): asyncio.Semaphore(p.concurrency) for p in self.parts.values()
                             if isinstance(p, AsyncRangeSource)}

        async def one(task: Task) -> None:
            if task.kind == "staged" and any(isinstance(self.parts[c.src_rank], AsyncRangeSource)
                                             for c in task.copies):
                await self._staged_async(task, pool)
                return
            if task.kind == "batch" and isinstance(task.part, AsyncRangeSource):
                async with sems[id(task.part)]:
                    reads = [(m.tensor, m.block[0], np.empty(m.block[1].shape, self.dests[(m.rank, m.tensor)].dtype))
                             for m in task.members]
                    t0 = time.perf_counter()
                    await task.part.read_many(task.copies[0].src_rank, reads)
                    self._read_seconds += time.perf_counter() - t0
                    await loop.run_in_executor(pool, self._finish_batch, task, reads)
                return
            if task.kind != "block" or not isinstance(task.part, AsyncRangeSource):
                await loop.run_in_executor(pool, self.run_task, task)
                return
            sem = sems[id(task.part)]
            src_w, dst_w = task.block
            c = task.copies[0]
            async with sem:  # held until the block is stored: at most `concurrency` buffers
                buf = np.empty(dst_w.shape, self.dests[(task.rank, task.tensor)].dtype)
                t0 = time.perf_counter()
                await task.part.read_into(c.src_rank, c.tensor, src_w, buf)
                self._read_seconds += time.perf_counter() - t0
                await loop.run_in_executor(pool, self._finish_block, task, dst_w, buf)

        for phase in self.phases:
            await _gather_or_cancel([one(t) for t in phase])

    def _finish_block(self, task: Task, dst_w: Window, buf: np.ndarray) -> None:
        self._store_block(task, dst_w, buf)
        self.done((task.rank, task.tensor))

    def _finish_batch(self, task: Task, reads: list) -> None:
        for m, (_, _, buf) in zip(task.members, reads):
            self._finish_block(m, m.block[1], buf)


async def _gather_or_cancel(coros) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and re-raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _SourceCheck:
    """:func:`~scalai.storage.verify.verify_source` of the tensors a run does not check on
    the way, on a thread of its own alongside the copy: the copy is bound by writes (into
    one file the kernel serializes them), the check by reads. ``seconds``: its own time."""

    def __init__(self, source: TensorSource, skip: frozenset, workers: int):
        self.stop = threading.Event()
        self.seconds = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scalai-verify")
        self._future = self._pool.submit(self._check, source, skip, workers)

    def _check(self, source: TensorSource, skip: frozenset, workers: int) -> None:
        t0 = time.perf_counter()
        try:
            verify_source(source, None, workers, self.stop, skip=skip)
        finally:
            self.seconds = time.perf_counter() - t0

    def result(self) -> None:
        """Wait for the check; raises ChecksumError where the source differs from its record
        (an interruption while waiting stops the check too)."""
        try:
            self._future.result()
        except BaseException:
            self.stop.set()
            raise
        finally:
            self._pool.shutdown()

    def cancel(self) -> None:
        """End the check early (at its next chunk) and wait for its threads."""
        self.stop.set()
        try:
            self._future.result()
        except BaseException:  # noqa: BLE001 - the copy's own error is the one raised
            pass
        finally:
            self._pool.shutdown()


def run_plan(plan: Plan, source: TensorSource, sink: TensorSink, *, workers: int | None = None,
             progress: Callable[[int], None] | None = None, verify: bool = False) -> RunReport:
    """Run every copy of ``plan`` from ``source`` (its old layout) into ``sink`` (its new one).

    Args:
        plan: copies with windows in local coordinates (see :class:`~scalai.planner.Copy`).
        source: the old layout's tensors (:class:`TensorSource`).
        sink: the new layout's (:class:`TensorSink`); elements no copy writes end up zero.
            The caller commits or aborts it afterwards.
        workers: threads (default: one per core, at most 8; at least a ranged source's
            ``concurrency``).
        progress: called with a byte count after each block written (<= 4 MiB), from
            worker threads, one call at a time.
        verify: check every stored tensor of ``source`` against its recorded CRC-32 before
            returning. Tensors whose bytes this run reads whole, as runs written as they are
            (tensors that move unchanged, the sides of a ZeRO split), are checked as they pass
            (no kernel copies or links for them then: their bytes go through this process
            once); the others by :func:`~scalai.storage.verify.verify_source` on a thread
            alongside the copy, with half the ``workers``. The report's ``seconds`` then
            hold ``verify`` (that thread's own time) and ``verify_wait`` (what the run waited
            for it after the copy).

    Returns:
        a :class:`RunReport` (bytes copied, time per part).

    Raises:
        PlanError: a copy does not fit the layouts or the sink. Nothing is written then.
        ValueError: source or sink hold another layout than the plan's.
        TypeError: source or sink are not declared sources and sinks.
        ChecksumError: with ``verify``, a source tensor differs from its record (the sink
            holds partial data then: the caller aborts it).
    """
    t0 = time.perf_counter()
    run = _Run(plan, source, sink, workers, progress, verify)
    check = _SourceCheck(source, frozenset(run.passing), max(1, run.workers // 2)) if verify else None
    try:
        run.start()
        run.prepare_seconds = time.perf_counter() - t0
        with ThreadPoolExecutor(run.workers, thread_name_prefix="scalai-run") as pool:
            if run.is_async:
                asyncio.run(run.run_async(pool))
            else:
                run.run_threads(pool)
        t1 = time.perf_counter()
        if check is not None:
            check.result()
            missed = set(run.passing) - run.crcs.checked
            if missed:  # expected to pass whole but did not (never so far): checked now
                ranks = sorted({r for r, _ in missed})
                others = {(r, n) for r in ranks for n in source.stored(r)} - missed
                verify_source(source, ranks, run.workers, skip=others)
    except BaseException:
        if check is not None:
            check.cancel()
        raise
    finally:
        run.release()
    report = run.report(time.perf_counter() - t0)
    if check is not None:
        report.seconds.update(verify=check.seconds, verify_wait=time.perf_counter() - t1)
    return report


async def run_plan_async(plan: Plan, source: TensorSource, sink: TensorSink, *, pool: Executor,
                         progress: Callable[[int], None] | None = None) -> RunReport:
    """:func:`run_plan` from inside a running event loop: blocking work goes to ``pool``,
    reads of :class:`AsyncRangeSource` parts are awaited here (at most each part's
    ``concurrency`` in flight)."""
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    run = await loop.run_in_executor(pool, lambda: _Run(plan, source, sink, None, progress))
    await loop.run_in_executor(pool, run.start)
    run.prepare_seconds = time.perf_counter() - t0
    try:
        await run.run_async(pool)
    finally:
        run.release()
    return run.report(time.perf_counter() - t0)
