"""Local reshard executor: run a :class:`~scalai.planner.Plan` on this host with threads.

``execute(plan, source, dest)`` streams every copy's source window into its destination
window. Sources and destinations are checkpoints (memory-mapped files) or in-memory
``{rank: {tensor: array}}`` mappings; no global tensor is ever built.

How bytes move (measured on a 2-core VM: see ``benchmarks/reshard.py``):

- a destination window that is contiguous in its file is written with ``pwrite`` (no page
  faults on the destination): straight from the source mapping when the source window is
  contiguous too, else gathered through a per-worker buffer of :data:`CHUNK_BYTES`;
- any other window is a strided numpy copy between the two mappings;
- work is grouped by destination rank (one file per task: buffered writes to one file
  serialize on its inode lock anyway), the largest groups first.

Memory bound: besides the page cache, the executor holds one :data:`CHUNK_BYTES` buffer
per worker; it never allocates a tensor.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping

import numpy as np

from .checkpoint.arrays import as_raw
from .checkpoint.reader import Checkpoint
from .checkpoint.writer import CheckpointWriter, default_workers
from .config import ParallelConfig, Placement
from .errors import PlanError
from .planner.plan import Copy, Deployment, Plan

__all__ = ["execute", "reshard_checkpoint", "ReshardTime", "CHUNK_BYTES"]

#: Bytes of the gather buffer of each worker, and the most one ``pwrite`` or progress step moves.
CHUNK_BYTES = 8 << 20


class _Arrays:
    """``{rank: {tensor: numpy array or torch tensor}}`` seen as raw arrays."""

    def __init__(self, arrays: Mapping[int, Mapping[str, Any]], ptc):
        self._arrays, self._ptc = arrays, ptc

    def view(self, rank: int, tensor: str) -> np.ndarray:
        try:
            array = self._arrays[rank][tensor]
        except KeyError:
            raise ValueError(f"no array for tensor {tensor} of rank {rank}; the mapping must hold "
                             f"every local tensor of ptc.rank_shards({rank})") from None
        return as_raw(array, self._ptc.spec(tensor).dtype, f"{tensor} of rank {rank}")


def _side(obj, ptc):
    return _Arrays(obj, ptc) if isinstance(obj, Mapping) else obj


def _check(plan: Plan) -> dict[tuple[int, str], int]:
    """Validate every copy against the layouts; return the covered volume per destination."""
    old = {r: dict(plan.old.ptc.rank_shards(r)) for r in plan.old.ptc.config.ranks()}
    new = {r: dict(plan.new.ptc.rank_shards(r)) for r in plan.new.ptc.config.ranks()}
    covered: dict[tuple[int, str], int] = defaultdict(int)
    for c in plan.copies:
        for window, shards, rank, side in ((c.src, new if c.from_new else old, c.src_rank, "source"),
                                           (c.dst, new, c.dst_rank, "destination")):
            shard = shards.get(rank, {}).get(c.tensor)
            region = window.region
            ok = shard is not None and region.ndim == len(shard.shape) and all(
                o + s <= n for o, s, n in zip(region.offsets, region.sizes, shard.shape))
            if ok and window.view is not None:
                ok = (np.prod(window.view, dtype=np.int64) == region.volume and window.sub is not None
                      and all(o + s <= n for o, s, n in zip(window.sub.offsets, window.sub.sizes, window.view)))
            if not ok:
                raise PlanError(f"copy of {c.tensor}: {side} window {window} does not fit rank "
                                f"{rank}'s local tensor ({shard.shape if shard else 'absent'})")
        if c.src.shape != c.dst.shape:
            raise PlanError(f"copy of {c.tensor}: source shape {c.src.shape} != destination {c.dst.shape}")
        covered[(c.dst_rank, c.tensor)] += c.dst.volume
    return covered


def _blocks(shape: tuple[int, ...], max_elems: int):
    """Index tuples cutting an array of ``shape`` into blocks of at most ~``max_elems``
    elements, each contiguous once copied out, in row-major order."""
    nd = len(shape)
    if nd == 0:
        yield ()
        return
    suffix = [1] * (nd + 1)
    for i in range(nd - 1, -1, -1):
        suffix[i] = suffix[i + 1] * shape[i]
    axis = next(i for i in range(nd) if suffix[i + 1] <= max_elems)
    step = max(1, max_elems // suffix[axis + 1])
    for prefix in np.ndindex(*shape[:axis]):
        for lo in range(0, shape[axis], step):
            yield prefix + (slice(lo, min(lo + step, shape[axis])),)


class _Worker:
    """Runs the copies into one destination rank; owns one gather buffer."""

    def __init__(self, source, dest, progress: Callable[[int], None] | None, lock: threading.Lock):
        self.source, self.dest, self.progress, self.lock = source, dest, progress, lock
        self.write = getattr(dest, "write", None)
        self.buf: np.ndarray | None = None

    def _tick(self, nbytes: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(nbytes)

    def run(self, copies: list[Copy]) -> None:
        for c in copies:
            src_local = (self.dest if c.from_new else self.source).view(c.src_rank, c.tensor)
            dst_local = self.dest.view(c.dst_rank, c.tensor)
            if src_local.dtype.itemsize != dst_local.dtype.itemsize:
                raise PlanError(f"{c.tensor}: source and destination element sizes differ")
            s, d = c.src.select(src_local), c.dst.select(dst_local)
            if d.size == 0:
                continue
            if self.write is not None and d.flags.c_contiguous:
                offset = d.ctypes.data - dst_local.ctypes.data
                self._pwrite(c, s, offset)
            else:
                np.copyto(d, s, casting="no")
                self._tick(d.nbytes)

    def _pwrite(self, c: Copy, s: np.ndarray, offset: int) -> None:
        if s.flags.c_contiguous:
            flat = memoryview(s.reshape(-1)).cast("B")
            for lo in range(0, flat.nbytes, CHUNK_BYTES):
                part = flat[lo:lo + CHUNK_BYTES]
                self.write(c.dst_rank, c.tensor, offset + lo, part)
                self._tick(part.nbytes)
            return
        if self.buf is None:
            self.buf = np.empty(CHUNK_BYTES, np.uint8)
        for block in _blocks(s.shape, CHUNK_BYTES // s.itemsize):
            part = s[block]
            staged = self.buf[:part.nbytes].view(s.dtype).reshape(part.shape)
            np.copyto(staged, part)
            self.write(c.dst_rank, c.tensor, offset, staged)
            offset += part.nbytes
            self._tick(part.nbytes)


def _raise_fd_limit(files: int) -> None:
    """Each open rank file costs two descriptors (file + mapping); make room if we can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * files + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY
                                                    else min(want, hard), hard))


def execute(plan: Plan, source, dest, workers: int | None = None,
            progress: Callable[[int], None] | None = None) -> int:
    """Run every copy of ``plan`` from ``source`` (old layout) into ``dest`` (new layout).

    Args:
        plan: copies with windows in local coordinates (see :class:`~scalai.planner.Copy`).
        source: a :class:`~scalai.checkpoint.Checkpoint`, or ``{rank: {tensor: array}}``
            of the old layout (numpy or torch, local shapes).
        dest: a :class:`~scalai.checkpoint.CheckpointWriter`, or a mapping of writable
            arrays of the new layout. Destination elements that no copy writes (padding)
            end up zero.
        workers: threads (default: one per core, at most 8).
        progress: called with a byte count after each copied piece (<= :data:`CHUNK_BYTES`),
            from worker threads, one call at a time.

    Returns:
        bytes copied.

    Raises:
        PlanError: a copy does not fit the layouts. Nothing is written in that case.
    """
    covered = _check(plan)
    source, dest = _side(source, plan.old.ptc), _side(dest, plan.new.ptc)
    if not getattr(dest, "zero_filled", False):
        for (rank, tensor), volume in covered.items():
            local = dest.view(rank, tensor)
            if volume < local.size:
                local[...] = 0
    _raise_fd_limit(len({c.src_rank for c in plan.copies if not c.from_new})
                    + len({c.dst_rank for c in plan.copies}))
    lock = threading.Lock()
    with ThreadPoolExecutor(workers or default_workers()) as pool:
        for phase in (False, True):  # from_new copies read what the first phase wrote
            groups: dict[int, list[Copy]] = defaultdict(list)
            for c in plan.copies:
                if c.from_new == phase:
                    groups[c.dst_rank].append(c)
            order = sorted(groups.values(), key=lambda g: -sum(c.nbytes for c in g))
            for group in order:  # write each file front to back
                index = {n: i for i, (n, _) in enumerate(plan.new.ptc.rank_shards(group[0].dst_rank))}
                group.sort(key=lambda c: (index[c.tensor], c.dst.region.offsets))
            worker = lambda group: _Worker(source, dest, progress, lock).run(group)  # noqa: E731
            list(pool.map(worker, order))
    return sum(c.nbytes for c in plan.copies)


class ReshardTime(float):
    """Total seconds of a reshard, with its parts as attributes (seconds):
    ``plan``, ``copy`` (executing the plan), ``checksum`` and ``sync`` (fsync + renames)."""

    plan: float
    copy: float
    checksum: float
    sync: float

    def __new__(cls, **parts: float) -> ReshardTime:
        obj = super().__new__(cls, sum(parts.values()))
        obj.__dict__.update(parts)
        return obj

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:.3f}" for k, v in self.__dict__.items())
        return f"ReshardTime({float(self):.3f}s: {parts})"


def reshard_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       new_config: ParallelConfig | str, placement: Placement | None = None,
                       workers: int | None = None, progress: Callable[[int], None] | None = None,
                       sync: bool = True) -> tuple[Plan, ReshardTime]:
    """Rewrite the checkpoint ``src_dir`` in layout ``new_config`` as ``out_dir``.

    Args:
        placement: where old and new ranks run (the same hosts); default: one host holding
            every rank, so that every copy is a local one.
        sync: fsync the new checkpoint (``ReshardTime.sync`` reports what that cost).

    Returns:
        the plan and the time it took (a float of seconds, with a breakdown).

    Raises:
        ValueError: ``new_config`` is not valid for the checkpoint's tensors.
        FileExistsError: ``out_dir`` exists (nothing is touched).
        CheckpointError: the source is incomplete or damaged. The source is never modified.
    """
    from .planner import make_plan

    t0 = time.perf_counter()
    new_config = ParallelConfig.parse(new_config)
    with Checkpoint.open(src_dir) as ckpt:
        old_ptc = ckpt.ptc
        new_ptc = old_ptc.relayout(new_config)
        if placement is None:
            placement = Placement(gpus_per_host=max(old_ptc.config.world_size, new_config.world_size))
        plan = make_plan(Deployment(old_ptc, placement), Deployment(new_ptc, placement))
        state = _carry_state(ckpt.state, old_ptc.config, new_config)
        t1 = time.perf_counter()
        with CheckpointWriter(out_dir, new_ptc, state, sync=sync) as writer:
            execute(plan, ckpt, writer, workers=workers, progress=progress)
            t2 = time.perf_counter()
            writer.commit(workers)
    return plan, ReshardTime(plan=t1 - t0, copy=t2 - t1, checksum=writer.timings["checksum"],
                             sync=writer.timings["sync"])


def _carry_state(state: dict, old: ParallelConfig, new: ParallelConfig) -> dict:
    """Non-tensor state for the new layout: ``scalai.state.carry_state`` when present."""
    try:
        from .state import carry_state
    except ImportError:
        return state
    return carry_state(state, old, new)
