"""Moving the bytes of copies into one destination tensor: the plan runner's inner loops.

Three ways, chosen per destination tensor by :mod:`scalai.storage.run`:

- *stream*: the destination window is one contiguous byte range of the tensor. The source
  selection is handed to the sink's ``write`` as it is when contiguous (``pwrite`` straight
  from a source mapping: no page faults and no zeroing on the destination side, which a
  copy through a writable mapping of a fresh file pays), or gathered through the worker's
  buffer first when strided. A run of a source file's bytes that must be checksummed on
  the way (a source check) is read into the worker's buffer instead (*stream_file*):
  ``pread`` block by block, each block's CRC-32 computed while it is in cache, then
  written; no page of the source is mapped, so no thread waits on page faults and nothing
  is left to unmap.
- *assemble*: some windows are strided in the destination (e.g. a tensor split along
  dim 1 becoming whole). The tensor is built block by block (whole rows, at most one
  buffer) from every copy into it, and each block is one ``write``.
- *strided*: anything else (a strided window of a flat ZeRO shard) is a strided numpy copy
  into the sink's array; a sink without arrays gets the whole tensor assembled in a
  buffer of its size and written once (*staged*).

Every ``write`` carries the CRC-32 of its block when the sink records checksums, computed
while the block is in cache, so the sink rarely has to read a tensor back to checksum it.
Time spent in each part is added to the worker's :class:`Clock`.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from math import prod
from typing import Callable, Sequence

import numpy as np

from ..regions import Region
from . import blocks as _blocks
from .blocks import blocks, select
from .checksum import crc32, crc32_combine

__all__ = ["Clock", "PARTS", "Filler", "Write"]

#: The parts of a run that :class:`Clock` times (seconds, summed over worker threads):
#: ``read`` (ranged reads from a remote source, reads of a source file into the buffer),
#: ``copy`` (gathering strided elements, copies into arrays), ``checksum`` (CRC-32 of
#: written blocks), ``write`` (the sink's writes), ``complete`` (the sink's per-tensor
#: completion: write-back, device copies).
PARTS = ("read", "copy", "checksum", "write", "complete")

_now = time.perf_counter

#: Bytes of a memory page (the alignment of the worker's buffer).
PAGE_BYTES = 4096


@dataclass
class Clock:
    """Seconds one worker thread spent in each of :data:`PARTS`."""

    read: float = 0.0
    copy: float = 0.0
    checksum: float = 0.0
    write: float = 0.0
    complete: float = 0.0


Write = Callable[[int, object, "int | None"], None]  # (byte offset, contiguous data, crc or None)


class Filler:
    """Fills destination tensors through ``write(byte_offset, data, crc)`` calls; owns one
    buffer of at least :data:`~scalai.storage.blocks.CHUNK_BYTES` (allocated on first need).

    Args:
        progress: called with the bytes of copied elements after every block.
        clock: where the time of each part goes.
    """

    def __init__(self, progress: Callable[[int], None], clock: Clock):
        self.progress = progress
        self.clock = clock
        self._buf: np.ndarray | None = None

    def buffer(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...], page_offset: int = 0) -> np.ndarray:
        """A view of the worker's buffer as ``dtype[shape]`` (``nbytes`` bytes), starting
        ``page_offset`` (0 to ``PAGE_BYTES - 1``) bytes after a page boundary."""
        if self._buf is None or self._buf.nbytes < nbytes + 2 * PAGE_BYTES:
            self._buf = np.empty(max(nbytes, _blocks.CHUNK_BYTES) + 2 * PAGE_BYTES, np.uint8)
        start = -self._buf.ctypes.data % PAGE_BYTES + page_offset
        return self._buf[start:start + nbytes].view(dtype).reshape(shape)

    def put(self, write: Write, offset: int, data: np.ndarray, checksum: bool, copied: int | None = None) -> int | None:
        """One ``write`` of contiguous ``data`` at byte ``offset``, with its CRC if ``checksum``
        (returned)."""
        clock = self.clock
        t0 = _now()
        crc = crc32(data) if checksum is True else None
        t1 = _now()
        write(offset, data, crc)
        clock.checksum += t1 - t0
        clock.write += _now() - t1
        self.progress(data.nbytes if copied is None else copied)
        return crc

    def stream(self, src: np.ndarray, write: Write, offset: int, checksum: bool | int) -> int | None:
        """Write the selection ``src`` (any strides) as the contiguous bytes at ``offset``.

        ``checksum``: ``True``: pass the CRC-32 of every block; ``False``: none; an int:
        the CRC-32 of all of ``src``, known already (then one ``write`` when contiguous).
        Returns the CRC-32 of all of ``src`` where ``checksum`` is ``True`` and ``src`` is
        contiguous (its blocks' combined), else ``None``."""
        step_bytes = _blocks.CHUNK_BYTES
        if checksum is not True and checksum is not False:
            if src.flags.c_contiguous:
                t0 = _now()
                write(offset, src.reshape(-1), checksum)
                self.clock.write += _now() - t0
                self.progress(src.nbytes)
                return
            checksum = True  # gathered block by block: each block's own CRC
        if src.flags.c_contiguous:
            flat = src.reshape(-1)
            step = max(1, step_bytes // src.itemsize)
            whole = None
            for lo in range(0, flat.size, step):
                block = flat[lo:lo + step]
                crc = self.put(write, offset + lo * src.itemsize, block, checksum)
                if checksum is True:
                    whole = crc if whole is None else crc32_combine(whole, crc, block.nbytes)
            return whole
        for index in blocks(src.shape, step_bytes // src.itemsize):
            part = src[index]
            t0 = _now()
            staged = self.buffer(part.nbytes, src.dtype, part.shape)
            np.copyto(staged, part)
            self.clock.copy += _now() - t0
            self.put(write, offset, staged, checksum)
            offset += part.nbytes
        return None

    def stream_file(self, fd: int, at: int, sizes: Sequence[int],
                    write: Callable[[int, int, np.ndarray, int], None]) -> list[int]:
        """Write the bytes of file ``fd`` from byte ``at``, which hold ``len(sizes)`` pieces one
        after the other (``sizes[i]`` bytes each: one run of a tensor, or whole tensors that
        lie one after the other), read (``pread``) block by block into the worker's buffer:
        each piece's share of a block goes to ``write(i, offset in piece i, bytes, their
        CRC-32)``. Returns every piece's CRC-32 (its shares' combined).

        Raises:
            OSError: the read failed, or the file ended before ``at + sum(sizes)``.
        """
        clock, step, total = self.clock, _blocks.CHUNK_BYTES, sum(sizes)
        # the bytes land at the offset in a page that they have in the file: a copy whose
        # destination lies just past its source modulo a page (8 bytes on) ran at a third
        # of the speed here (4 KiB aliasing); the file's own offsets are what the copy
        # through a mapping would have had
        buf = self.buffer(min(step, total), np.uint8, (min(step, total),), at % PAGE_BYTES)
        crcs = [0] * len(sizes)
        piece, into, done = 0, 0, 0  # the piece being written, its bytes written so far
        while done < total:
            t0 = _now()
            block = buf[:min(step, total - done)]
            got = os.preadv(fd, [block], at + done)
            if got == 0:
                raise OSError(errno.EIO, f"the source file ended {total - done} bytes early")
            clock.read += _now() - t0
            pos = 0
            while pos < got:
                while not sizes[piece] - into:  # pieces of no bytes
                    piece, into = piece + 1, 0
                n = min(sizes[piece] - into, got - pos)
                share = block[pos:pos + n]
                t1 = _now()
                crc = crc32(share)
                t2 = _now()
                write(piece, into, share, crc)
                clock.checksum += t2 - t1
                clock.write += _now() - t2
                crcs[piece] = crc if into == 0 else crc32_combine(crcs[piece], crc, n)
                pos, into = pos + n, into + n
            done += got
            self.progress(got)
        return crcs

    def assemble(self, shape: tuple[int, ...], dtype: np.dtype, pieces: Sequence[tuple[Region, np.ndarray]],
                 write: Write, checksum: bool,
                 passed: Sequence[Callable[[np.ndarray], None] | None] | None = None) -> None:
        """Build a tensor of ``shape`` from ``(destination box, source selection)`` pieces,
        block of rows by block of rows; rows that no piece touches are not written,
        uncovered elements of a written block are zero. Rows must fit the buffer.
        ``passed[i]``: called with each contiguous block of piece ``i``'s source selection
        once it is copied (a source check counts the bytes that passed)."""
        row = prod(shape[1:])
        step = max(1, _blocks.CHUNK_BYTES // (row * dtype.itemsize))
        lo = min(box.offsets[0] for box, _ in pieces)
        hi = max(box.ends[0] for box, _ in pieces)
        for r0 in range(lo, hi, step):
            r1 = min(r0 + step, hi)
            block = Region((r0,) + (0,) * (len(shape) - 1), (r1 - r0,) + tuple(shape[1:]))
            cuts = [(cut, box, s, p) for (box, s), p in zip(pieces, passed or [None] * len(pieces))
                    if (cut := box.intersect(block)) is not None]
            if not cuts:
                continue
            t0 = _now()
            staged = self.buffer(block.volume * dtype.itemsize, dtype, block.sizes)
            covered = sum(cut.volume for cut, *_ in cuts)
            if covered < block.volume:
                staged[...] = 0
            for cut, box, s, _ in cuts:
                staged[cut.relative_to(block).to_slices()] = s[cut.relative_to(box).to_slices()]
            self.clock.copy += _now() - t0
            for cut, box, s, p in cuts:
                if p is not None:
                    part = s[cut.relative_to(box).to_slices()]
                    if part.flags.c_contiguous:
                        p(part)
            self.put(write, r0 * row * dtype.itemsize, staged, checksum, copied=covered * dtype.itemsize)

    def strided(self, target: np.ndarray, src: np.ndarray) -> None:
        """Copy ``src`` into ``target`` (a window of a sink's array), both of one shape."""
        t0 = _now()
        np.copyto(target, src)
        self.clock.copy += _now() - t0
        self.progress(target.nbytes)

    def staged(self, shape: tuple[int, ...], dtype: np.dtype, pieces: Sequence[tuple[object, np.ndarray]],
               write: Write, checksum: bool) -> None:
        """Assemble a whole tensor from ``(destination window, source selection)`` pieces in
        a buffer of its size (uncovered elements zero) and write it once: for sinks
        without arrays, when windows are too strided to assemble by rows."""
        t0 = _now()
        whole = np.zeros(shape, dtype)
        copied = 0
        for window, s in pieces:
            np.copyto(select(window, whole), s)
            copied += s.nbytes
        self.clock.copy += _now() - t0
        self.put(write, 0, whole, checksum, copied=copied)
