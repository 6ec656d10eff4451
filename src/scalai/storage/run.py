"""``run_plan``: the one runner of plans, from any :class:`TensorSource` into any :class:`TensorSink`.

Every plan of scalai runs here: a checkpoint reshard (files to files), a store's part of a
distributed transformation (its own mapped tensors and peers' ranged reads into new tensor
files), training load (saved tensors into live ones) and save (live tensors into files).

How:

1. The plan is checked against both layouts (every window fits its local tensor; sources
   and destinations are the plan's) and against the sink (it stores every destination; a
   host fan-out needs a sink it can read back). Nothing is written when that fails.
2. Copies are grouped into tasks: one per destination tensor for copies from addressable
   sources (its copies are written together: streamed, assembled or copied in place, see
   :mod:`scalai.storage.filler`), one per block of at most ``block_bytes`` for copies
   from ranged sources. Tasks run on a thread pool, largest first (so the last ones to
   finish are small ones), ``from_new`` copies (a host fan-out) after all others.
3. The rule for bytes that move unchanged lives here (``_whole_source_crc``): a copy of a
   whole source tensor whose source records its CRC-32, into a contiguous range of a sink
   that records checksums, hands the sink that CRC instead of computing one (a tensor
   that moves whole keeps its CRC; one merged from whole tensors gets theirs combined).
   When both sides are files (:class:`FileSource`, :class:`FileSink`) such a copy runs
   inside the kernel (``copy_file_range``: no page mapped, no byte through user space).
   Every other block written to such a sink carries its CRC, computed while the block is
   in cache.
4. When a destination tensor's last task is done, ``sink.complete`` is called (write-back
   starts, a device copy is made) while other tensors are still being filled.

Memory bound: besides the sink's own (page cache, RAM it holds), one buffer of
:data:`~scalai.storage.blocks.CHUNK_BYTES` (or a ranged source's ``block_bytes``) per worker;
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

from ..dtypes import raw_numpy
from ..errors import PlanError
from ..planner.plan import Copy, Plan, Window
from ..regions import Region, subtract
from . import blocks as _blocks
from .base import (ArraySink, ArraySource, AsyncRangeSource, FileSink, FileSource, RangeSource, TensorSink,
                   TensorSource, same_tensors)
from .blocks import select, split_window, window_span
from .filler import PARTS, Clock, Filler

__all__ = ["run_plan", "run_plan_async", "RunReport", "default_workers", "check_plan", "uncovered"]


def default_workers() -> int:
    """Threads for copies and checksums: one per core, at most 8 (memory-bound beyond)."""
    import os

    return max(1, min(8, os.cpu_count() or 1))


@dataclass(frozen=True)
class RunReport:
    """What a run did.

    Attributes:
        bytes: bytes copied into the sink (the copies' ``nbytes``).
        copies: copies run.
        tensors: destination tensors written.
        workers: threads used.
        seconds: ``total`` (wall time of the run), ``prepare`` (its first part, before any
            copy: checking and grouping the plan, the sink's ``prepare``, zeroing padding)
            and each of :data:`~scalai.storage.filler.PARTS` (seconds summed over the worker
            threads: with ``workers`` threads they add up to at most ``workers x total``).
    """

    bytes: int
    copies: int
    tensors: int
    workers: int
    seconds: dict[str, float] = field(default_factory=dict)

    def parts(self) -> str:
        """``read 0.00 · copy 0.12 · ...`` for a report line (parts that took any time)."""
        return " · ".join(f"{p} {self.seconds[p]:.2f}" for p in PARTS if self.seconds.get(p))


def _fits(region: Region, shape: tuple[int, ...]) -> bool:
    offsets, sizes = region.offsets, region.sizes
    if len(offsets) != len(shape):
        return False
    for o, s, n in zip(offsets, sizes, shape):
        if o + s > n:
            return False
    return True


def check_plan(plan: Plan) -> dict[tuple[int, str], list[Window]]:
    """Validate every copy against the plan's layouts; the destination windows per
    destination (rank, tensor).

    Raises:
        PlanError: naming the first copy whose window does not fit its rank's local tensor,
            or whose source and destination shapes differ.
    """
    old_ptc, new_ptc = plan.old.ptc, plan.new.ptc
    shapes: dict[tuple[bool, int], dict[str, tuple[int, ...]]] = {}

    def shape_of(new: bool, rank: int, tensor: str) -> tuple[int, ...] | None:
        table = shapes.get((new, rank))
        if table is None:
            ptc = new_ptc if new else old_ptc
            table = shapes[(new, rank)] = ({n: s.shape for n, s in ptc.rank_shards(rank)}
                                           if 0 <= rank < ptc.config.world_size else {})
        return table.get(tensor)

    windows: dict[tuple[int, str], list[Window]] = defaultdict(list)
    for c in plan.copies:
        for window, new, rank, side in ((c.src, c.from_new, c.src_rank, "source"),
                                        (c.dst, True, c.dst_rank, "destination")):
            shape = shape_of(new, rank, c.tensor)
            ok = shape is not None and _fits(window.region, shape)
            if ok and window.view is not None:
                ok = (prod(window.view) == window.region.volume and window.sub is not None
                      and _fits(window.sub, window.view))
            if not ok:
                raise PlanError(f"copy of {c.tensor}: {side} window {window} does not fit rank "
                                f"{rank}'s local tensor ({shape if shape is not None else 'absent'})")
        if c.src.shape != c.dst.shape:
            raise PlanError(f"copy of {c.tensor}: source shape {c.src.shape} != destination {c.dst.shape}")
        windows[(c.dst_rank, c.tensor)].append(c.dst)
    return windows


def uncovered(shape: tuple[int, ...], windows: list[Window], limit: int = 64) -> list[Region] | None:
    """The boxes of a tensor of ``shape`` that no window writes (its padding), or ``None``
    when that is not worth computing (windows of flat views, or very many windows)."""
    if len(windows) > limit or any(w.view is not None for w in windows):
        return None
    left = [Region.full(shape)]
    for w in windows:
        left = [piece for box in left for piece in subtract(box, w.region)]
    return [box for box in left if box.volume]


@dataclass
class _Dest:
    """A destination tensor: local shape, raw dtype, tasks still to run."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pending: int = 0
    mixed: bool = False  # written by several tasks: never assembled (that zeroes what is not its own)


@dataclass
class _Task:
    """One unit of work: ``kind`` is ``arrays`` (every copy into one tensor from addressable
    arrays: a source's, or the sink's for ``from_new``), ``block`` (one block of one copy
    from a ranged source) or ``staged`` (a whole tensor assembled in a buffer, for a sink
    without arrays whose windows cannot be written by rows)."""

    kind: str
    rank: int
    tensor: str
    copies: list[Copy]
    nbytes: int
    block: tuple[Window, Window] | None = None
    part: TensorSource | None = None
    turn: int = 0  # a block's place among the blocks read from its source host


class _Run:
    def __init__(self, plan: Plan, source: TensorSource, sink: TensorSink, workers: int | None,
                 progress: Callable[[int], None] | None):
        if not isinstance(source, TensorSource):
            raise TypeError(f"source {source!r} is not a TensorSource; wrap arrays in ArraysSource, open "
                            f"checkpoints with Checkpoint.open")
        if not isinstance(sink, TensorSink):
            raise TypeError(f"sink {sink!r} is not a TensorSink; wrap arrays in ArraysSink, write "
                            f"checkpoints with CheckpointWriter")
        self.windows = check_plan(plan)
        for obj, ptc, side in ((source, plan.old.ptc, "source"), (sink, plan.new.ptc, "destination")):
            if not same_tensors(obj.ptc, ptc):
                raise ValueError(f"the {side} holds layout {obj.ptc.config} of its tensors, the plan was "
                                 f"made for {ptc.config} (or for other tensors); plan from the {side}'s "
                                 f"own layout")
        self.plan, self.source, self.sink = plan, source, sink
        self.checksum = sink.records_checksums
        self.arrays = isinstance(sink, ArraySink)
        self.files = isinstance(sink, FileSink)  # kernel copies file to file (until one is refused)
        if not sink.zero_filled and not self.arrays:
            raise TypeError(f"{type(sink).__name__} is neither zero_filled nor an ArraySink; the runner "
                            f"cannot zero the elements no copy writes")
        self.parts: dict[int, TensorSource] = {}
        by_dest: dict[tuple[int, str], list[Copy]] = defaultdict(list)
        for c in plan.copies:
            if not sink.stores(c.dst_rank, c.tensor):
                raise PlanError(f"the plan copies {c.tensor} into rank {c.dst_rank}, whose replica the "
                                f"destination stores elsewhere; plan into ptc.stored_replicas()")
            if c.from_new and not self.arrays:
                raise PlanError(f"the plan copies {c.tensor} from new rank {c.src_rank} (a host fan-out), "
                                f"but {type(sink).__name__} cannot be read back; plan with fanout=False")
            if not c.from_new and c.src_rank not in self.parts:
                part = self.parts[c.src_rank] = source.part(c.src_rank)
                if not isinstance(part, (ArraySource, RangeSource, AsyncRangeSource)):
                    raise TypeError(f"source part {type(part).__name__} of rank {c.src_rank} declares no way "
                                    f"to read (ArraySource, RangeSource or AsyncRangeSource)")
            if c.dst.volume:
                by_dest[(c.dst_rank, c.tensor)].append(c)
        self.dests: dict[tuple[int, str], _Dest] = {}
        phases: tuple[list[_Task], list[_Task]] = ([], [])
        shapes: dict[int, dict] = {}
        dtypes: dict[str, np.dtype] = {}
        for (rank, tensor), copies in by_dest.items():
            copies.sort(key=lambda c: c.dst.region.offsets)
            if rank not in shapes:
                shapes[rank] = {n: s.shape for n, s in plan.new.ptc.rank_shards(rank)}
            dtype = dtypes.get(tensor)
            if dtype is None:
                dtype = dtypes[tensor] = raw_numpy(plan.new.ptc.spec(tensor).dtype)
            dest = self.dests[(rank, tensor)] = _Dest(shapes[rank][tensor], dtype)
            fanout, local, ranged = [], [], []
            for c in copies:
                (fanout if c.from_new else local if isinstance(self.parts[c.src_rank], ArraySource)
                 else ranged).append(c)
            dest.mixed = sum(map(bool, (fanout, local, ranged))) > 1
            if not self.arrays and not self._rows_only(dest, local, ranged):
                phases[0].append(_Task("staged", rank, tensor, copies, sum(c.nbytes for c in copies)))
                continue
            if local:
                phases[0].append(_Task("arrays", rank, tensor, local, sum(c.nbytes for c in local)))
            size = dest.dtype.itemsize
            for c in ranged:
                part = self.parts[c.src_rank]
                for sw, dw in split_window(c.src, c.dst, size, part.block_bytes):
                    phases[0].append(_Task("block", rank, tensor, [c], dw.volume * size, (sw, dw), part))
            if fanout:
                phases[1].append(_Task("arrays", rank, tensor, fanout, sum(c.nbytes for c in fanout)))
        for phase in phases:
            turns: dict[str, int] = defaultdict(int)
            for t in phase:
                self.dests[(t.rank, t.tensor)].pending += 1
                if t.kind == "block":  # blocks of equal size: every source host's turn in turn
                    t.turn = turns[t.copies[0].src_host]
                    turns[t.copies[0].src_host] += 1
            phase.sort(key=lambda t: (-t.nbytes, t.turn))  # largest first: the pool ends on small tasks
        self.phases = phases
        self.copies = sum(len(c) for c in by_dest.values())
        self.bytes = sum(c.nbytes for copies in by_dest.values() for c in copies)
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

    @staticmethod
    def _rows_only(dest: _Dest, local: list[Copy], ranged: list[Copy]) -> bool:
        """Whether a sink without arrays can take this tensor's copies as contiguous writes:
        every destination window contiguous, or (addressable sources only) assembled by rows."""
        spans = [window_span(dest.shape, c.dst) for c in local + ranged]
        if None not in spans:
            return True
        return not ranged and all(c.dst.view is None for c in local) and \
            prod(dest.shape[1:]) * dest.dtype.itemsize <= _blocks.CHUNK_BYTES

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
        """Prepare the sink; in a sink that is not zero-filled, zero what no copy writes."""
        self.sink.prepare(sorted({rank for rank, _ in self.windows}))
        if self.sink.zero_filled:
            return
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
        return RunReport(self.bytes, self.copies, len(self.dests), self.workers, seconds)

    # -- tasks --------------------------------------------------------------------------
    def run_task(self, task: _Task) -> None:
        if task.kind == "staged":
            self._staged(task)  # calls done() itself
            return
        if task.kind == "block":
            self._ranged(task)
        else:
            self._arrays(task)
        self.done((task.rank, task.tensor))

    def _arrays(self, task: _Task) -> None:
        """Every copy into one tensor, from addressable arrays (a source, or the sink)."""
        rank, tensor, copies = task.rank, task.tensor, task.copies
        dest, sink, filler = self.dests[(rank, tensor)], self.sink, self.filler()
        selected = []
        for c in copies:
            local = sink.written(c.src_rank, tensor) if c.from_new else self.parts[c.src_rank].array(c.src_rank, tensor)
            if local.dtype.itemsize != dest.dtype.itemsize:
                raise PlanError(f"{tensor}: source and destination element sizes differ")
            selected.append((c, select(c.src, local), local.shape))
        if self.arrays and not self.checksum:  # memory to memory: one copy per window, no blocks
            target = sink.array(rank, tensor)
            for c, s, _ in selected:
                filler.strided(select(c.dst, target), s)
            return
        write = partial(sink.write, rank, tensor)
        spans = [window_span(dest.shape, c.dst) for c, _, _ in selected]
        if None in spans and not dest.mixed and all(c.dst.view is None for c, _, _ in selected) \
                and prod(dest.shape[1:]) * dest.dtype.itemsize <= _blocks.CHUNK_BYTES:
            filler.assemble(dest.shape, dest.dtype, [(c.dst.region, s) for c, s, _ in selected], write, self.checksum)
            return
        target = None
        for (c, s, src_shape), span in zip(selected, spans):
            if span is None:
                if target is None:
                    target = sink.array(rank, tensor)
                filler.strided(select(c.dst, target), s)
                continue
            offset = span * dest.dtype.itemsize
            crc = self._whole_source_crc(c, src_shape)
            if crc is None:
                filler.stream(s, write, offset, self.checksum)
            elif not self._kernel_copy(c, rank, tensor, offset, s.nbytes, crc):
                filler.stream(s, write, offset, crc)

    def _whole_source_crc(self, c: Copy, src_shape: tuple[int, ...]) -> int | None:
        """The rule for bytes that move unchanged, in one place: a copy that reads a whole
        source tensor (no view) carries the CRC-32 its source records to the sink, for the
        contiguous bytes it writes; they are not checksummed again. A tensor filled by one
        such copy keeps its source's CRC; one filled by several gets theirs combined."""
        if not self.checksum or c.from_new or c.src.view is not None or c.src.region.sizes != src_shape:
            return None
        return self.parts[c.src_rank].checksum(c.src_rank, c.tensor)

    def _kernel_copy(self, c: Copy, rank: int, tensor: str, offset: int, nbytes: int, crc: int) -> bool:
        """Copy a whole source tensor file to file inside the kernel (no page of either file
        mapped here, no byte through user space) when both sides are files; False if not."""
        part = self.parts[c.src_rank]
        if not (self.files and isinstance(part, FileSource)) or not nbytes:
            return False
        fd, start = part.file_range(c.src_rank, c.tensor)
        clock = self.filler().clock
        t0 = time.perf_counter()
        done = self.sink.copy_from(rank, tensor, offset, fd, start, nbytes, crc)
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

    def _ranged(self, task: _Task) -> None:
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

    def _direct(self, task: _Task, dst_w: Window) -> np.ndarray | None:
        """The sink's own memory for a block, when a ranged read can land there directly
        (an array sink that keeps no checksums, a contiguous selection); else None."""
        if not self.arrays or self.checksum:
            return None
        target = select(dst_w, self.sink.array(task.rank, task.tensor))
        return target if target.flags.c_contiguous else None

    def _store_block(self, task: _Task, dst_w: Window, buf: np.ndarray) -> None:
        dest, filler = self.dests[(task.rank, task.tensor)], self.filler()
        span = window_span(dest.shape, dst_w)
        if span is not None:
            filler.put(partial(self.sink.write, task.rank, task.tensor), span * dest.dtype.itemsize,
                       buf, self.checksum)
        else:
            filler.strided(select(dst_w, self.sink.array(task.rank, task.tensor)), buf)

    def _staged(self, task: _Task) -> None:
        """A tensor of a sink without arrays whose windows are too strided to write by
        rows: assembled whole in a buffer (uncovered elements zero), written once."""
        whole = self._whole(task)
        for c in task.copies:
            self._stage(c, whole)
        self._put_whole(task, whole)

    def _whole(self, task: _Task) -> np.ndarray:
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

    def _put_whole(self, task: _Task, whole: np.ndarray) -> None:
        self.filler().put(partial(self.sink.write, task.rank, task.tensor), 0, whole, self.checksum, copied=0)
        self.done((task.rank, task.tensor))

    async def _staged_async(self, task: _Task, pool: Executor) -> None:
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
        """Every task on the pool's threads, each thread taking the next task in order; after
        a failure no task starts, the running ones end, and the first error is raised."""
        for phase in self.phases:  # from_new copies read what the first phase wrote
            tasks, lock, failed = iter(phase), threading.Lock(), []

            def worker() -> None:
                while not failed:
                    with lock:
                        task = next(tasks, None)
                    if task is None:
                        return
                    try:
                        self.run_task(task)
                    except BaseException as exc:  # noqa: BLE001 - raised below, in the caller
                        failed.append(exc)

            wait([pool.submit(worker) for _ in range(min(self.workers, len(phase)))])
            if failed:
                raise failed[0]

    async def run_async(self, pool: Executor) -> None:
        loop = asyncio.get_running_loop()
        sems = self._sems = {id(p): asyncio.Semaphore(p.concurrency) for p in self.parts.values()
                             if isinstance(p, AsyncRangeSource)}

        async def one(task: _Task) -> None:
            if task.kind == "staged" and any(isinstance(self.parts[c.src_rank], AsyncRangeSource)
                                             for c in task.copies):
                await self._staged_async(task, pool)
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

    def _finish_block(self, task: _Task, dst_w: Window, buf: np.ndarray) -> None:
        self._store_block(task, dst_w, buf)
        self.done((task.rank, task.tensor))


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


def run_plan(plan: Plan, source: TensorSource, sink: TensorSink, *, workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> RunReport:
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

    Returns:
        a :class:`RunReport` (bytes copied, time per part).

    Raises:
        PlanError: a copy does not fit the layouts or the sink. Nothing is written then.
        ValueError: source or sink hold another layout than the plan's.
        TypeError: source or sink are not declared sources and sinks.
    """
    t0 = time.perf_counter()
    run = _Run(plan, source, sink, workers, progress)
    run.start()
    run.prepare_seconds = time.perf_counter() - t0
    with ThreadPoolExecutor(run.workers, thread_name_prefix="scalai-run") as pool:
        if run.is_async:
            asyncio.run(run.run_async(pool))
        else:
            run.run_threads(pool)
    return run.report(time.perf_counter() - t0)


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
    await run.run_async(pool)
    return run.report(time.perf_counter() - t0)
