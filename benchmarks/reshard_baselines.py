"""Sides (b), (c), (c-t), (c') and (c'') of ``reshard.py``: consolidate-then-split, and the floors.

(b) :func:`consolidate_then_split` is DeepSpeed's universal-checkpoint approach, written
the way a careful implementation would be, with what scalai's own writer has (its CRC-32
too: zlib-ng's, as scalai computes it):

- *consolidate*: every global tensor into one scratch file of its own, assembled from one
  replica of every distinct shard. A shard whose global box is one run of the tensor's
  bytes is written straight from its memory map (``pwrite`` in 4 MiB blocks); otherwise
  (tensors split along a later dimension) the tensor is assembled block by block of whole
  rows (at most 4 MiB staged per thread), one ``pwrite`` per block. Scratch files are not
  fsynced and not checksummed. Threads: ``workers``, largest tensors first.
- *split*: every new rank file cut from the scratch files through scalai's own
  :class:`~scalai.checkpoint.CheckpointWriter` (same format, so the result is compared like
  scalai's), each replica stored once; every piece of a new local tensor is written with
  ``CheckpointWriter.write`` in blocks of at most 4 MiB with the block's CRC-32 computed
  while it is in cache (as scalai's plan runner does: no read-back at commit), writeback of
  every finished tensor started at once (``complete``, as scalai does), fsync and
  renames at commit.

(c) :class:`MemoryCopy`: ``np.copyto`` of a byte count between two pre-faulted buffers,
RAM to RAM, in threads: the physical limit of moving bytes.

(c-t) :class:`WindowCopy`: the copies of a plan made beforehand (untimed), each window
``np.copyto``'d from the old arrays into the new ones, in threads that were dealt the
copies largest first to the least loaded thread: what any runner that copies tensor by
tensor between arrays must do, without planning it, grouping it or keeping its books. The
gap between (c) and (c-t) is the cost of moving many separate, partly strided windows
instead of one buffer; the gap between (c-t) and scalai's RAM -> RAM is scalai's own.

(c') :func:`file_copy`: the storage's own floor. One new file per new rank, as many bytes
as scalai writes into that rank's file, filled by the kernel (``copy_file_range``) from the
old rank files taken in turn, in 64 MiB chunks shared out over the threads (each starts on
a file of its own, then helps with the others; a single new file gets every thread) with
writeback started after each chunk (``sync_file_range``, as scalai's writer does), then
fsynced: no layout logic, no checksum. (c'b) the same bytes through a buffer of this
process instead (``file_copy(mode="buffered")``: ``pread`` then ``pwrite``, as ``dd`` or
``rsync`` copy), since which of the two is faster depends on the file system: the report
holds scalai against the faster. (c'') the buffered copy with every block's CRC-32
computed on the way (``mode="checked"``): the floor of a checked copy.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from math import prod
from typing import Callable

import numpy as np

from scalai.checkpoint import Checkpoint, CheckpointWriter
from scalai.config import ParallelConfig
from scalai.dtypes import raw_numpy
from scalai.regions import Region
from scalai.state import carry_state
from scalai.storage.checksum import crc32

__all__ = ["consolidate_then_split", "MemoryCopy", "file_copy", "BLOCK_BYTES"]

#: The most one staged block or one write moves (scalai's plan runner uses the same).
BLOCK_BYTES = 4 << 20
_MEMCPY_BUFFER = 512 << 20
_COPY_CHUNK = 64 << 20
# A buffered copy's block: read, checksummed if checked, and written while in cache. 1 MiB
# was the fastest of 0.5, 1, 2, 4 and 16 MiB on tmpfs here (2-4 % ahead of 4 MiB).
_BLOCK = 1 << 20
_PAGE = 4096


# ---------------------------------------------------------------------------------------
# (b) consolidate-then-split


def _run_start(shape: tuple[int, ...], box: Region) -> int | None:
    """Row-major element offset of ``box`` in an array of ``shape`` when the box is one
    contiguous run there, else ``None``."""
    nd, k = len(shape), 0
    while k < nd and box.sizes[k] == 1:
        k += 1
    if any(box.offsets[d] != 0 or box.sizes[d] != shape[d] for d in range(k + 1, nd)):
        return None
    return sum(o * prod(shape[d + 1:]) for d, o in enumerate(box.offsets))


class _Staging(threading.local):
    """One reusable staging buffer per thread."""

    buf: np.ndarray | None = None

    def take(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        if self.buf is None or self.buf.nbytes < nbytes:
            self.buf = np.empty(max(nbytes, BLOCK_BYTES), np.uint8)
        return self.buf[:nbytes].view(dtype).reshape(shape)


def _write_blocks(write: Callable[[int, np.ndarray], None], data: np.ndarray, offset: int,
                  staging: _Staging) -> None:
    """Write ``data`` (any strides) as contiguous bytes from ``offset`` in blocks of at most
    :data:`BLOCK_BYTES`: straight from ``data`` when contiguous, else staged block by block
    of leading rows."""
    if data.nbytes == 0:
        return
    if data.flags.c_contiguous:
        flat = data.reshape(-1)
        step = max(1, BLOCK_BYTES // data.itemsize)
        for lo in range(0, flat.size, step):
            write(offset + lo * data.itemsize, flat[lo:lo + step])
        return
    row = data[0].nbytes if data.ndim > 1 else data.itemsize
    step = max(1, BLOCK_BYTES // row)
    for lo in range(0, data.shape[0], step):
        part = data[lo:lo + step]
        staged = staging.take(part.nbytes, data.dtype, part.shape)
        np.copyto(staged, part)
        write(offset, staged)
        offset += part.nbytes


def _pwrite_all(fd: int, offset: int, data: np.ndarray) -> None:
    view = memoryview(data.reshape(-1)).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _consolidate(ckpt: Checkpoint, spec, path: str, staging: _Staging) -> None:
    """One global tensor into its own scratch file (not fsynced, no checksum)."""
    raw = raw_numpy(spec.dtype)
    parts = []  # (global box, the source array of that box's shape)
    for holding in ckpt.ptc.holdings(spec.name):  # one replica of every distinct shard
        local = ckpt.view(holding.ranks[0], spec.name)
        for p in holding.shard.pieces:
            parts.append((p.global_region, local[p.local_region.to_slices()].reshape(p.global_region.sizes)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, spec.nbytes)
        write = lambda off, block: _pwrite_all(fd, off, block)  # noqa: E731
        starts = [_run_start(spec.shape, box) for box, _ in parts]
        if None not in starts:  # every shard is one run of the file: written straight
            for (_, data), start in zip(parts, starts):
                _write_blocks(write, data, start * raw.itemsize, staging)
            return
        row = prod(spec.shape[1:])  # else: blocks of whole rows, assembled from every shard
        step = max(1, BLOCK_BYTES // (row * raw.itemsize))
        for r0 in range(0, spec.shape[0], step):
            block = Region((r0,) + (0,) * (len(spec.shape) - 1),
                           (min(step, spec.shape[0] - r0),) + tuple(spec.shape[1:]))
            staged = staging.take(block.volume * raw.itemsize, raw, block.sizes)
            for box, data in parts:
                cut = box.intersect(block)
                if cut is not None:
                    staged[cut.relative_to(block).to_slices()] = data[cut.relative_to(box).to_slices()]
            write(r0 * row * raw.itemsize, staged)
    finally:
        os.close(fd)


def _split(writer: CheckpointWriter, scratch: str, rank: int, name: str, shard, staging: _Staging) -> None:
    """One local tensor of the new layout from the scratch file of its global tensor."""
    spec = writer.ptc.spec(name)
    raw = raw_numpy(spec.dtype)
    full = (np.memmap(os.path.join(scratch, name + ".bin"), raw, "r", shape=spec.shape)
            if spec.nbytes else np.zeros(spec.shape, raw))

    def write(offset: int, block: np.ndarray) -> None:
        writer.write(rank, name, offset, block, crc32(block))

    for p in shard.pieces:  # padding (vocabulary) is left to the writer's zero fill
        start = _run_start(shard.shape, p.local_region)
        if start is None:
            raise NotImplementedError(f"{name} on rank {rank}: a piece that is not one run of the local "
                                      f"tensor; this baseline writes contiguous pieces only")
        _write_blocks(write, full[p.global_region.to_slices()], start * raw.itemsize, staging)
    writer.complete(rank, name)


def consolidate_then_split(src: str, scratch: str, out: str, new: ParallelConfig,
                           workers: int) -> dict[str, float]:
    """(b): the checkpoint ``src`` consolidated into ``scratch`` (one file per global
    tensor), then split into the checkpoint ``out`` of layout ``new``. Returns seconds:
    ``total``, ``consolidate``, ``split`` (writing the new files) and ``commit`` (their
    checksums combined, fsync and renames)."""
    t0 = time.perf_counter()
    staging = _Staging()
    with Checkpoint.open(src) as ckpt:
        os.makedirs(scratch)
        specs = sorted(ckpt.ptc.specs, key=lambda s: -s.nbytes)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda s: _consolidate(ckpt, s, os.path.join(scratch, s.name + ".bin"), staging),
                          specs))
        with open(os.path.join(scratch, "index.json"), "w") as f:
            json.dump({s.name: {"dtype": s.dtype, "shape": list(s.shape)} for s in specs}, f)
        old_ptc, state = ckpt.ptc, carry_state(ckpt.state, ckpt.ptc.config, new)
    t1 = time.perf_counter()
    new_ptc = old_ptc.relayout(new)
    with CheckpointWriter(out, new_ptc, state, sync=True) as writer:
        tasks = [(r, name, shard) for r in range(new.world_size) for name, shard in new_ptc.rank_shards(r)
                 if writer.stores(r, name)]  # each replica once, files front to back
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda t: _split(writer, scratch, *t, staging), tasks))
        t2 = time.perf_counter()
        writer.commit(workers)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "consolidate": t1 - t0, "split": t2 - t1, "commit": t3 - t2}


# ---------------------------------------------------------------------------------------
# (c) memory copy and (c') file copy


class MemoryCopy:
    """``nbytes`` copied RAM -> RAM by ``workers`` threads between two pre-faulted buffers
    of at most 512 MiB (copied round until the count is reached: far larger than any
    cache, so the rate is RAM's)."""

    def __init__(self, nbytes: int, workers: int):
        size = min(nbytes, _MEMCPY_BUFFER)
        self.src = np.ones(size, np.uint8)
        self.dst = np.ones(size, np.uint8)  # every page faulted in before timing
        self.workers = workers
        self.tasks, done = [], 0
        while done < nbytes:
            lo = done % size
            n = min(_COPY_CHUNK, size - lo, nbytes - done)
            self.tasks.append((lo, n))
            done += n

    def run(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda t: np.copyto(self.dst[t[0]:t[0] + t[1]], self.src[t[0]:t[0] + t[1]]),
                          self.tasks))
        return {"total": time.perf_counter() - t0}


class WindowCopy:
    """(c-t): every copy of ``plan`` with elements, ``np.copyto`` from its window of
    ``source[rank][tensor]`` into its window of ``dest[rank][tensor]`` (numpy arrays of the
    old and new layouts' local tensors, raw dtypes), by ``workers`` threads. The windows
    are selected and dealt before timing: each, largest first, to the thread with the
    fewest bytes so far."""

    def __init__(self, plan, source: dict[int, dict[str, np.ndarray]], dest: dict[int, dict[str, np.ndarray]],
                 workers: int):
        from scalai.storage.blocks import select

        pairs = sorted(((select(c.dst, dest[c.dst_rank][c.tensor]), select(c.src, source[c.src_rank][c.tensor]))
                        for c in plan.copies if c.dst.volume), key=lambda p: -p[0].nbytes)
        self.dealt: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(max(1, workers))]
        loads = [0] * len(self.dealt)
        for pair in pairs:
            i = loads.index(min(loads))
            self.dealt[i].append(pair)
            loads[i] += pair[0].nbytes

    def run(self) -> dict[str, float]:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(self.dealt)) as pool:
            list(pool.map(lambda pairs: [np.copyto(d, s) for d, s in pairs], self.dealt))
        return {"total": time.perf_counter() - t0}


def _load_sync_file_range():
    try:
        import ctypes
        import ctypes.util

        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()


COPY_MODES = ("kernel", "buffered", "checked")


def file_copy(src: str, out: str, sizes: list[int], workers: int, mode: str = "kernel") -> dict[str, float]:
    """(c'): ``sizes[r]`` bytes into ``out/rank-r.bin`` for every new rank ``r``, copied by
    the kernel from the old rank files of ``src`` (the new files laid one after the other
    over the old ones read in turn, so that each byte is read once until all were: as in a
    reshard, no two threads read the same bytes, which one would find in the cache)
    in chunks of 64 MiB (``copy_file_range`` at explicit offsets), writeback started after
    every chunk, each file fsynced at the end. ``workers`` threads share the chunks: each
    takes its next from the file with the most chunks left that no other thread copies
    into (writes into one file take turns on its inode lock), so the files drain together
    and the threads end together.

    ``mode``: ``"kernel"`` as above (c'); ``"buffered"`` (c'b): every byte passes through
    this process instead, in 1 MiB blocks read (``pread``) into a buffer of each thread's,
    at the same offset in a page as in the file (a copy 8 bytes ahead of its source modulo
    a page runs at a third of the speed here), then ``pwrite``; ``"checked"`` (c''): the
    buffered copy with each block's CRC-32 computed while it is in cache (zlib-ng, as
    scalai's check): the floor of a copy that reads what it copies, as a source check
    must. (Reading through memory maps of the old files instead was about 7 % slower
    here: page faults, and the unmapping at the end.)"""
    if mode not in COPY_MODES:
        raise ValueError(f"file copy mode {mode!r} is not one of {', '.join(COPY_MODES)}")
    buffered = mode != "kernel"
    t0 = time.perf_counter()
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    lengths = [os.path.getsize(os.path.join(src, f)) for f in files]
    os.makedirs(out)
    ins = [os.open(os.path.join(src, f), os.O_RDONLY) for f in files]
    outs = [os.open(os.path.join(out, f"rank-{r:05d}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
            for r in range(len(sizes))]
    queues: list[list[tuple[int, int, int, int]]] = []  # per new file: (out offset, old file, offset, bytes)
    at = 0  # where the next new file starts in the old files, read one after the other (then again)
    for rank, size in enumerate(sizes):
        chunks, k, offset, written = [], 0, at % sum(lengths), 0
        while offset >= lengths[k]:
            k, offset = k + 1, offset - lengths[k]
        at += size
        while written < size:
            if offset == lengths[k]:
                k, offset = (k + 1) % len(files), 0
                continue
            n = min(size - written, lengths[k] - offset, _COPY_CHUNK)
            chunks.append((written, k, offset, n))
            offset, written = offset + n, written + n
        queues.append(chunks[::-1])  # popped from the end: in file order
    lock = threading.Lock()

    writing: dict[int, int] = {}  # worker -> the new file it copies into

    def next_chunk(worker: int) -> tuple[int, tuple[int, int, int, int]] | None:
        with lock:  # the file with the most chunks left that no other thread copies into
            writing.pop(worker, None)
            live = [q for q in range(len(queues)) if queues[q]]
            if not live:
                return None
            free = [q for q in live if q not in writing.values()] or live
            rank = max(free, key=lambda q: (len(queues[q]), q == worker % len(queues)))
            writing[worker] = rank
            return rank, queues[rank].pop()

    def copy(worker: int) -> None:
        buf = np.empty(_BLOCK + 2 * _PAGE, np.uint8) if buffered else None
        page = -buf.ctypes.data % _PAGE if buffered else 0  # where a page starts in buf
        while (job := next_chunk(worker)) is not None:
            rank, (at, k, offset, n) = job
            while n:
                if buffered:  # each block at its file offset's place in a page, as scalai's reads
                    view = buf[page + offset % _PAGE:][:min(n, _BLOCK)]
                    block = view[:os.preadv(ins[k], [view], offset)]
                    if mode == "checked":
                        crc32(block)  # what a check computes of each block (and compares, at no cost)
                    done = os.pwrite(outs[rank], block, at)
                else:
                    done = os.copy_file_range(ins[k], outs[rank], n, offset, at)
                if _SYNC_FILE_RANGE is not None:
                    _SYNC_FILE_RANGE(outs[rank], at, done, 2)  # SYNC_FILE_RANGE_WRITE: start writeback
                at, offset, n = at + done, offset + done, n - done

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(copy, range(workers)))
            list(pool.map(os.fsync, outs))
    finally:
        for fd in ins + outs:
            os.close(fd)
    return {"total": time.perf_counter() - t0}
