"""Grouping a plan into the plan runner's tasks, and the checks before any byte moves. Pure.

:func:`check_plan` validates every copy's windows against both layouts; :func:`group`
turns a checked plan into tasks for :mod:`scalai.storage.run`, deciding per destination
tensor how its copies run from what the source's parts and the sink declare:

- ``arrays``: every copy into one tensor from addressable arrays (a source's, or the sink's
  for a host fan-out's ``from_new`` copies) in one task, so that they can be streamed,
  assembled by rows or copied in place together;
- ``block``: one block of at most ``block_bytes`` of one copy from a ranged source;
- ``batch``: small blocks (at most ``1 /`` :data:`SMALL_FRACTION` of ``block_bytes``) read from one
  rank of a ranged source (blocking or async) that declares ``coalesce``, packed in the
  source's tensor order up to ``block_bytes`` (and :data:`MAX_PACKED` blocks): one
  ``read_many`` call, so that a medium where a request costs more than its bytes (an object
  store, a peer store over HTTP) fetches neighbours together;
- ``stream``: for a ``StreamingSource`` (an object store), one piece
  (:mod:`scalai.storage.pieces`) of the blocks read from it: the source is handed all the
  blocks at once and says which requests fetch them; each piece is one task whose
  ``members`` are the blocks it serves;
- ``staged``: a whole tensor assembled in a buffer, for a sink without arrays whose windows
  cannot be written as contiguous runs;
- ``chain`` (:func:`chain_moves`, made by the runner once it knows where tensors lie in
  the files): ``arrays`` tasks of whole tensors that move unchanged and lie one after the
  other in one source file and in one destination file, joined into one kernel copy.

Tasks come in two phases (``from_new`` copies read what the first one wrote), each ordered
largest first, blocks of equal size taking every source host's turn in turn.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod

import numpy as np

from ..dtypes import raw_numpy
from ..errors import PlanError
from ..planner.plan import Copy, Plan, Window
from ..regions import Region, flat_runs, gaps, subtract
from . import blocks as _blocks
from .base import ArraySink, ArraySource, AsyncRangeSource, RangeSource, StreamingSource, TensorSink, TensorSource
from .blocks import split_window, window_span

__all__ = ["default_workers", "check_plan", "uncovered", "Dest", "Task", "Grouping", "group", "order_phase",
           "Move", "chain_moves", "Dealer", "SMALL_FRACTION", "MAX_PACKED", "CHAIN_BYTES"]

#: A block of at most ``1 / SMALL_FRACTION`` of its source's ``block_bytes`` is packed with
#: others of the same source rank into a ``batch`` task.
SMALL_FRACTION = 4
#: The most blocks packed into one ``batch`` task (one request of a coalescing source).
MAX_PACKED = 1024
#: The most bytes of whole tensors, consecutive in both files, joined into one ``chain``
#: task (one kernel copy): a plain file copy's chunk.
CHAIN_BYTES = 64 << 20


def default_workers() -> int:
    """Threads for copies and checksums: one per core, at most 8 (memory-bound beyond)."""
    return max(1, min(8, os.cpu_count() or 1))


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

    def shapes_of(new: bool, rank: int) -> dict[str, tuple[int, ...]]:
        table = shapes.get((new, rank))
        if table is None:
            ptc = new_ptc if new else old_ptc
            table = shapes[(new, rank)] = ({n: s.shape for n, s in ptc.rank_shards(rank)}
                                           if 0 <= rank < ptc.config.world_size else {})
        return table

    windows: dict[tuple[int, str], list[Window]] = defaultdict(list)
    for c in plan.copies:
        for window, new, rank, side in ((c.src, c.from_new, c.src_rank, "source"),
                                        (c.dst, True, c.dst_rank, "destination")):
            shape = shapes_of(new, rank).get(c.tensor)
            if not _window_fits(window, shape):
                raise PlanError(f"copy of {c.tensor}: {side} window {window} does not fit rank "
                                f"{rank}'s local tensor ({shape if shape is not None else 'absent'})")
        if c.src.shape != c.dst.shape:
            raise PlanError(f"copy of {c.tensor}: source shape {c.src.shape} != destination {c.dst.shape}")
        windows[(c.dst_rank, c.tensor)].append(c.dst)
    return windows


def _window_fits(window: Window, shape: tuple[int, ...] | None) -> bool:
    """Whether ``window`` selects elements of a local tensor of ``shape`` (``None``: absent)."""
    if shape is None or not _fits(window.region, shape):
        return False
    return window.view is None or (prod(window.view) == window.region.volume and window.sub is not None
                                   and _fits(window.sub, window.view))


def uncovered(shape: tuple[int, ...], windows: list[Window], limit: int = 64) -> list[Region] | None:
    """The boxes of a tensor of ``shape`` that no window writes (its padding), or ``None``
    when that is not worth computing (more than ``limit`` windows, or windows of views, of
    a tensor of more than one dimension). A flat tensor (a ZeRO shard: many windows, views
    of its ranges) gets its gaps from the windows' sorted element runs."""
    if len(shape) == 1:
        return _flat_gaps(shape[0], windows)
    if len(windows) > limit or any(w.view is not None for w in windows):
        return None
    left = [Region.full(shape)]
    for w in windows:
        left = [piece for box in left for piece in subtract(box, w.region)]
    return [box for box in left if box.volume]


def _flat_gaps(n: int, windows: list[Window], max_runs: int = 1 << 14) -> list[Region] | None:
    """The ranges of a flat tensor of ``n`` elements that no window writes; ``None`` when
    the windows' selections fall into more than ``max_runs`` runs."""
    runs: list[tuple[int, int]] = []
    for w in windows:
        start = w.region.offsets[0]
        if w.view is None:
            runs.append((start, start + w.region.sizes[0]))
            continue
        inner = flat_runs(w.view, w.sub)
        if len(runs) + len(inner) > max_runs:
            return None
        runs.extend((start + a, start + b) for a, b in inner)
    return [Region((a,), (b - a,)) for a, b in gaps(runs, n)]


@dataclass
class Dest:
    """A destination tensor: local shape, raw dtype, tasks still to run."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pending: int = 0
    mixed: bool = False  # written by several tasks: never assembled (that zeroes what is not its own)


@dataclass
class Task:
    """One unit of work: ``kind`` is ``arrays`` (every copy into one tensor from addressable
    arrays: a source's, or the sink's for ``from_new``), ``block`` (one block of one copy
    from a ranged source), ``batch`` (``members``: small ``block`` tasks of one source rank,
    read together; ``rank`` and ``tensor`` are its first member's), ``stream`` (``members``:
    the blocks one piece of a streaming source serves), ``chain`` (``members``: ``arrays``
    tasks of whole tensors consecutive in both files, one kernel copy; see
    :func:`chain_moves`) or ``staged`` (a whole tensor assembled in a buffer, for a sink
    without arrays whose windows cannot be written by rows)."""

    kind: str
    rank: int
    tensor: str
    copies: list[Copy]
    nbytes: int
    block: tuple[Window, Window] | None = None
    part: TensorSource | None = None
    turn: int = 0  # a block's place among the blocks read from its source host
    members: list[Task] = field(default_factory=list)
    piece: object = None  # a ``stream`` task's Piece (its ``reads`` index ``members`` in order), a chain's moves


@dataclass
class Grouping:
    """A plan grouped for the runner.

    Attributes:
        windows: destination windows per (rank, tensor) (every copy, empty ones included).
        dests: the destination tensors written, by (rank, tensor).
        phases: the tasks of the two phases, in the order to start them.
        parts: the source part that reads each old rank read.
        copies, bytes: copies with elements, and their bytes.
    """

    windows: dict[tuple[int, str], list[Window]]
    dests: dict[tuple[int, str], Dest]
    phases: tuple[list[Task], list[Task]]
    parts: dict[int, TensorSource]
    copies: int
    bytes: int


def _rows_only(dest: Dest, local: list[Copy], ranged: list[Copy]) -> bool:
    """Whether a sink without arrays can take this tensor's copies as contiguous writes:
    every destination window contiguous, or (addressable sources only) assembled by rows."""
    spans = [window_span(dest.shape, c.dst) for c in local + ranged]
    if None not in spans:
        return True
    return not ranged and all(c.dst.view is None for c in local) and \
        prod(dest.shape[1:]) * dest.dtype.itemsize <= _blocks.CHUNK_BYTES


def group(plan: Plan, source: TensorSource, sink: TensorSink) -> Grouping:
    """Check ``plan`` against its layouts and the sink, and group it into tasks.

    Raises:
        PlanError: a window does not fit; the sink does not store a destination; a host
            fan-out into a sink that cannot be read back.
        TypeError: a source part declares no way to read.
    """
    windows = check_plan(plan)
    arrays = isinstance(sink, ArraySink)
    parts: dict[int, TensorSource] = {}
    addressable: dict[int, bool] = {}  # old rank -> its part is an ArraySource
    by_dest: dict[tuple[int, str], list[Copy]] = defaultdict(list)
    for c in plan.copies:
        if c.from_new:
            if not arrays:
                raise PlanError(f"the plan copies {c.tensor} from new rank {c.src_rank} (a host fan-out), "
                                f"but {type(sink).__name__} cannot be read back; plan with fanout=False")
        elif c.src_rank not in parts:
            part = parts[c.src_rank] = source.part(c.src_rank)
            if not isinstance(part, (ArraySource, RangeSource, AsyncRangeSource)):
                raise TypeError(f"source part {type(part).__name__} of rank {c.src_rank} declares no way "
                                f"to read (ArraySource, RangeSource or AsyncRangeSource)")
            addressable[c.src_rank] = isinstance(part, ArraySource)
        if c.dst.volume:
            by_dest[(c.dst_rank, c.tensor)].append(c)
    for rank, tensor in windows:  # every destination, written or (all padding) not
        if not sink.stores(rank, tensor):
            raise PlanError(f"the plan copies {tensor} into rank {rank}, whose replica the "
                            f"destination stores elsewhere; plan into ptc.stored_replicas()")
    dests: dict[tuple[int, str], Dest] = {}
    phases: tuple[list[Task], list[Task]] = ([], [])
    shapes: dict[int, dict] = {}
    dtypes: dict[str, np.dtype] = {}
    for (rank, tensor), copies in by_dest.items():
        if len(copies) > 1:
            copies.sort(key=lambda c: c.dst.region.offsets)
        if rank not in shapes:
            shapes[rank] = {n: s.shape for n, s in plan.new.ptc.rank_shards(rank)}
        dtype = dtypes.get(tensor)
        if dtype is None:
            dtype = dtypes[tensor] = raw_numpy(plan.new.ptc.spec(tensor).dtype)
        dest = dests[(rank, tensor)] = Dest(shapes[rank][tensor], dtype)
        fanout, local, ranged = [], [], []
        for c in copies:
            (fanout if c.from_new else local if addressable[c.src_rank] else ranged).append(c)
        dest.mixed = sum(map(bool, (fanout, local, ranged))) > 1
        if not arrays and not _rows_only(dest, local, ranged):
            phases[0].append(Task("staged", rank, tensor, copies, sum(c.nbytes for c in copies)))
            continue
        if local:
            phases[0].append(Task("arrays", rank, tensor, local, sum(c.nbytes for c in local)))
        size = dest.dtype.itemsize
        for c in ranged:
            part = parts[c.src_rank]
            for sw, dw in split_window(c.src, c.dst, size, part.block_bytes):
                phases[0].append(Task("block", rank, tensor, [c], dw.volume * size, (sw, dw), part))
        if fanout:
            phases[1].append(Task("arrays", rank, tensor, fanout, sum(c.nbytes for c in fanout)))
    phases[0][:] = _pack_small_blocks(_streamed_blocks(phases[0]), plan)
    for phase in phases:
        turns: dict[str, int] = defaultdict(int)
        for t in phase:
            for member in t.members or (t,):
                dests[(member.rank, member.tensor)].pending += 1
            if t.kind in ("block", "batch", "stream"):  # equal sizes: every source host's turn in turn
                t.turn = turns[t.copies[0].src_host]
                turns[t.copies[0].src_host] += 1
        order_phase(phase, plan, sink)
    return Grouping(windows, dests, phases, parts, sum(len(c) for c in by_dest.values()),
                    sum(c.nbytes for copies in by_dest.values() for c in copies))


def order_phase(phase: list[Task], plan: Plan, sink: TensorSink) -> None:
    """Sort a phase's tasks into the order to start them: largest first (the pool ends on
    small tasks), or for a sink that declares ``in_order``, its files' order (it then holds
    only the parts being filled)."""
    if sink.in_order:
        orders = {r: {n: i for i, (n, _) in enumerate(plan.new.ptc.rank_shards(r))}
                  for r in {t.rank for t in phase}}
        phase.sort(key=lambda t: (t.rank, orders[t.rank].get(t.tensor, 0),
                                  (t.block[1] if t.block else t.copies[0].dst).region.offsets))
    else:
        phase.sort(key=lambda t: (-t.nbytes, t.turn))


@dataclass(frozen=True)
class Move:
    """A destination tensor that is one whole source tensor, unchanged, file to file:
    ``task`` (its ``arrays`` task) copies the ``task.nbytes`` bytes at ``start`` of source
    file ``fd`` to byte ``at`` of rank ``task.rank``'s file; ``crc``: their CRC-32 (or
    ``None``); ``checked``: the bytes pass through the process, for the source check,
    instead of being copied by the kernel."""

    task: Task
    fd: int
    start: int
    at: int
    crc: int | None
    checked: bool = False


def chain_moves(moves: list[Move], limit: int = CHAIN_BYTES) -> list[Task]:
    """``chain`` tasks for the moves that follow one another both in one source file and
    in one destination file, and are all ``checked`` or all not, joined while they add up
    to at most ``limit`` bytes (a chunk as large as a plain file copy's): each is one
    kernel copy instead of one per tensor, or one stream of reads through the process for
    checked moves. A chain's ``members`` are its moves' tasks, in file order; ``piece``
    its moves."""
    runs: list[list[Move]] = []
    size = 0
    for m in sorted(moves, key=lambda m: (m.task.rank, m.at)):
        last = runs[-1][-1] if runs else None
        if (last is not None and last.task.rank == m.task.rank and last.fd == m.fd
                and last.at + last.task.nbytes == m.at and last.start + last.task.nbytes == m.start
                and last.checked == m.checked
                and size + m.task.nbytes <= limit):
            runs[-1].append(m)
            size += m.task.nbytes
        else:
            runs.append([m])
            size = m.task.nbytes
    return [Task("chain", run[0].task.rank, run[0].task.tensor, [c for m in run for c in m.task.copies],
                 sum(m.task.nbytes for m in run), members=[m.task for m in run], piece=run)
            for run in runs if len(run) > 1]


def _streamed_blocks(tasks: list[Task]) -> list[Task]:
    """``tasks`` with the blocks of ``StreamingSource``s grouped by the pieces
    the source reads them in (all blocks read from one source handed over at once)."""
    by_part: dict[int, list[Task]] = defaultdict(list)
    out = []
    for t in tasks:
        if t.kind == "block" and isinstance(t.part, StreamingSource):
            by_part[id(t.part)].append(t)
        else:
            out.append(t)
    for blocks in by_part.values():
        part = blocks[0].part
        for piece in part.pieces([(t.copies[0].src_rank, t.tensor, t.block[0]) for t in blocks]):
            members = [blocks[i] for i in piece.reads]
            if members:
                first = members[0]
                out.append(Task("stream", first.rank, first.tensor, [c for m in members for c in m.copies],
                                sum(m.nbytes for m in members), part=part, members=members, piece=piece))
    return out


def _pack_small_blocks(tasks: list[Task], plan: Plan) -> list[Task]:
    """``tasks`` with the small blocks of each coalescing ranged source rank packed into
    ``batch`` tasks of at most its ``block_bytes``, in the order the source rank lists its
    tensors (their order in its files), then by window."""
    small: dict[tuple[int, int], list[Task]] = defaultdict(list)
    out = []
    for t in tasks:
        if t.kind == "block" and isinstance(t.part, (RangeSource, AsyncRangeSource)) and t.part.coalesce \
                and t.nbytes * SMALL_FRACTION <= t.part.block_bytes:
            small[(id(t.part), t.copies[0].src_rank)].append(t)
        else:
            out.append(t)
    for (_, src_rank), blocks in small.items():
        order = {name: i for i, (name, _) in enumerate(plan.old.ptc.rank_shards(src_rank))}
        blocks.sort(key=lambda t: (order.get(t.tensor, len(order)), t.block[0].region.offsets))
        limit = blocks[0].part.block_bytes
        pack: list[Task] = []
        size = 0
        for t in blocks + [None]:
            if pack and (t is None or size + t.nbytes > limit or len(pack) == MAX_PACKED):
                first = pack[0]
                out.append(Task("batch", first.rank, first.tensor, [c for m in pack for c in m.copies], size,
                                part=first.part, members=pack))
                pack, size = [], 0
            if t is not None:
                pack.append(t)
                size += t.nbytes
    return out


class Dealer:
    """Hands a phase's tasks to ``workers`` threads, each thread keeping to the destination
    ranks (files) dealt to it: writes into one file serialize in the kernel (tmpfs, ext4:
    the inode's lock), so two threads writing one file wait for each other while another
    file could be written. Ranks are dealt by bytes (the largest to the least loaded
    thread), so that a thread's large tensors run beside another's many small ones. A
    thread drains its ranks together (its next task from its rank with the most bytes left
    that no other thread writes), so that a thread done early finds a file of the others'
    that nobody writes; with ``in_order`` (a sink filled in file order) it fills them one
    after the other instead, about one file per thread at a time. A thread whose ranks are
    done helps with the rank with the most bytes left that no other thread is writing, or,
    when every rank left is being written, with the one with the most bytes left. Each
    rank's tasks keep the phase's order. Thread-safe."""

    def __init__(self, tasks: list[Task], workers: int, in_order: bool = False):
        self._queues: dict[int, list[Task]] = defaultdict(list)
        for t in tasks:
            self._queues[t.rank].append(t)
        for q in self._queues.values():
            q.reverse()  # pop() from the end: the phase's order
        self._left = {r: sum(t.nbytes for t in q) for r, q in self._queues.items()}
        loads = [0] * max(1, workers)
        self.dealt: list[list[int]] = [[] for _ in loads]
        for r in sorted(self._left, key=lambda r: (-self._left[r], r)):
            i = loads.index(min(loads))
            self.dealt[i].append(r)
            loads[i] += self._left[r]
        self._writing: dict[int, int] = {}  # worker -> the rank of the task it runs
        self._in_order = in_order
        self._lock = threading.Lock()

    def next(self, worker: int) -> Task | None:
        """The next task for thread ``worker`` (0 <= worker < workers), whose previous task
        is done; None when none is left."""
        with self._lock:
            self._writing.pop(worker, None)
            busy = set(self._writing.values())
            mine = [r for r in self.dealt[worker] if self._queues[r]]
            if mine and self._in_order:
                rank = mine[0]
            elif mine:
                rank = max([r for r in mine if r not in busy] or mine, key=lambda r: self._left[r])
            else:
                live = [r for r, q in self._queues.items() if q]
                if not live:
                    return None
                rank = max([r for r in live if r not in busy] or live, key=lambda r: self._left[r])
            task = self._queues[rank].pop()
            self._left[rank] -= task.nbytes
            self._writing[worker] = rank
            return task
