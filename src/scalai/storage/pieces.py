"""Reading one stored file as a few large requests: which byte ranges to fetch, and what
each fetched byte is for. Pure planning plus the bookkeeping of one streamed request.

A :class:`~scalai.storage.StreamingSource` (an object store) is handed
every window a plan reads from one rank file at once. :func:`plan_pieces` groups the
windows' byte runs, in file order, into **pieces**: one request each, covering the runs of
the windows it serves and the gaps between them. Runs closer than ``max_gap`` share a
piece (reading a gap costs less than another request); a piece stops growing past
``max_bytes`` (at a window's end: every window lies in exactly one piece). With
``max_gap=0`` the pieces hold exactly the windows' bytes. ``cover`` ranges are read too
(with no window): a reader that checks a file's CRC-32s reads all of it.

:class:`PieceFeed` takes a piece's bytes as they arrive, in order and in chunks of any
size, copies each run into its window's output, says when a window is complete, and keeps
the CRC-32 of every stored tensor's bytes that pass, so that a tensor whose bytes all
passed (in one piece or several) is checked against its record (:class:`CrcCheck`).
Memory: the chunk in hand; outputs are the caller's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import ChecksumError
from ..planner.plan import Window
from ..regions import flat_runs
from .checksum import crc32, crc32_of_pieces

__all__ = ["Piece", "window_runs", "plan_pieces", "PieceFeed", "CrcCheck"]


@dataclass(frozen=True)
class Piece:
    """One unit of reading: the ``spans`` of bytes (one request each, in file order) of a
    file between ``start`` and ``stop``.

    Attributes:
        file: which file (a source's rank whose file it reads).
        spans: ``[a, b)`` byte ranges fetched; runs and cover ranges closer than the gap
            allowed share one.
        reads: indices of the windows it serves (all their bytes lie inside).
        runs: ``(file start, file stop, read index, byte offset in that read's output)``,
            sorted by file start.
    """

    start: int
    stop: int
    reads: tuple[int, ...]
    runs: tuple[tuple[int, int, int, int], ...]
    file: int = 0
    spans: tuple[tuple[int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def window_runs(start: int, shape: tuple[int, ...], itemsize: int, window: Window) -> list[tuple[int, int]]:
    """File byte ranges ``[a, b)`` of ``window`` of a tensor of local ``shape`` stored
    row-major from byte ``start``, in the order of the window's elements."""
    runs = flat_runs(shape, window.region)
    if window.view is not None:  # a box of a flat (ZeRO) range seen as ``view``: its runs only
        (base, _), = runs
        runs = [(base + a, base + b) for a, b in flat_runs(window.view, window.sub)]
    return [(start + a * itemsize, start + b * itemsize) for a, b in runs]


def plan_pieces(reads: Sequence[list[tuple[int, int]]], cover: Sequence[tuple[int, int]] = (),
                max_gap: int = 0, max_bytes: int = 64 << 20) -> list[Piece]:
    """Pieces (requests) that fetch every run of ``reads`` (one list of file byte runs per
    window, in the window's element order) and every byte of ``cover``.

    Windows (their first to last byte) and cover ranges closer than ``max_gap`` bytes share
    a piece; a piece is closed once it reaches ``max_bytes``, between windows (a window is
    never split; overlapping windows stay together). Inside a piece, runs closer than
    ``max_gap`` share a span (one request). Returns pieces in file order.
    """
    items = []  # (first byte, last byte, read index or -1, runs)
    for i, runs in enumerate(reads):
        live = [(a, b) for a, b in runs if b > a]
        if live:
            items.append((min(a for a, _ in live), max(b for _, b in live), i, runs))
    # cover ranges in pieces of at most ``max_bytes``, so that a file read whole is several
    # requests (at once, on S3) rather than one
    items += [(x, min(x + max_bytes, b), -1, ()) for a, b in cover for x in range(a, b, max(1, max_bytes))]
    items.sort(key=lambda t: (t[0], t[1]))
    pieces: list[Piece] = []
    group: list = []
    lo = hi = 0
    for item in items + [None]:
        if group and (item is None or item[0] > hi + max_gap or (item[0] >= hi and hi - lo >= max_bytes)):
            pieces.append(_close(group, lo, hi, max_gap))
            group = []
        if item is None:
            break
        if not group:
            lo, hi = item[0], item[1]
        hi = max(hi, item[1])
        group.append(item)
    return pieces


def _close(group: list, lo: int, hi: int, max_gap: int) -> Piece:
    """A group's piece: its windows' runs, and spans of runs and cover ranges."""
    runs, reads, ranges = [], [], []
    for first, last, i, item_runs in group:
        if i < 0:
            ranges.append((first, last))
            continue
        reads.append(i)
        at = 0
        for a, b in item_runs:
            runs.append((a, b, i, at))
            ranges.append((a, b))
            at += b - a
    runs.sort()
    spans: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if spans and a <= spans[-1][1] + max_gap:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return Piece(lo, hi, tuple(reads), tuple(runs), spans=tuple((a, b) for a, b in spans))


class CrcCheck:
    """The CRC-32s of one source's stored tensors, checked as their bytes pass in pieces
    (from any number of threads). A tensor is checked once all its bytes were seen.

    Args:
        expected: ``key -> (stored CRC-32 or None, nbytes)``.
        where: ``key -> str`` naming the tensor's file for messages.
    """

    def __init__(self, expected: Callable[[object], tuple[int | None, int]], where: Callable[[object], str]):
        self._expected, self._where = expected, where
        self._pieces: dict[object, list[tuple[int, int, int]]] = {}
        self._seen: dict[object, int] = {}
        self.checked: set = set()
        self._lock = threading.Lock()

    def add(self, key, offset: int, nbytes: int, crc: int) -> None:
        """``nbytes`` bytes of tensor ``key`` from byte ``offset`` passed, with CRC ``crc``."""
        want, total = self._expected(key)
        if want is None:
            return
        with self._lock:
            if key in self.checked:
                return
            pieces = self._pieces.setdefault(key, [])
            pieces.append((offset, nbytes, crc))
            self._seen[key] = self._seen.get(key, 0) + nbytes
            if self._seen[key] < total:
                return
            got = _whole_crc(pieces, total)
            if got is None:
                return  # overlapping pieces: not a full pass yet
            del self._pieces[key], self._seen[key]
            self.checked.add(key)
        if got != want:
            name = key[1] if isinstance(key, tuple) else key
            raise ChecksumError.mismatch(self._where(key), name, want, got)


def _whole_crc(pieces: list[tuple[int, int, int]], total: int) -> int | None:
    """The CRC of a tensor from pieces that cover it exactly once; None otherwise (some
    bytes seen twice: drop duplicates first)."""
    unique = sorted(set(pieces))
    pos = 0
    for offset, length, _ in unique:
        if offset != pos:
            return None
        pos += length
    return crc32_of_pieces(unique, total) if pos == total else None


class PieceFeed:
    """The bytes of one piece, fed span by span in order: runs copied into outputs,
    windows completed, tensors' CRC-32s kept.

    Args:
        piece: what is being read.
        tensors: ``(key, file start, nbytes)`` of the file's stored tensors, in file order.
        out: ``read index -> writable uint8 array`` of the window's bytes (called once, at
            the window's first byte).
        done: ``read index``: the window's bytes are all in its output.
        check: where passing tensor bytes are reported (or ``None``).
    """

    def __init__(self, piece: Piece, tensors: Sequence[tuple[object, int, int]],
                 out: Callable[[int], np.ndarray] | None, done: Callable[[int], None] | None,
                 check: CrcCheck | None):
        self.piece, self.out, self.done, self.check = piece, out, done, check
        self.pos = piece.start
        self._left: dict[int, int] = {}
        for a, b, i, _ in piece.runs:
            self._left[i] = self._left.get(i, 0) + (b - a)
        self._outs: dict[int, np.ndarray] = {}
        self._next = 0  # first run not finished
        self._tensors = [t for t in tensors if t[1] < piece.stop and t[1] + t[2] > piece.start]
        self._t = 0  # first tensor not passed yet
        self._seg: list | None = None  # [tensor index, first byte, crc] of the tensor passing now
        self._end = 0  # the byte after the last one in ``_seg``

    def seek(self, pos: int) -> None:
        """The next bytes fed start at file byte ``pos`` (a new span)."""
        self._flush()
        self.pos = pos

    def feed(self, chunk) -> None:
        """The next bytes of the current span (any length)."""
        data = np.frombuffer(chunk, np.uint8)
        lo, hi = self.pos, self.pos + data.size
        runs = self.piece.runs
        j = self._next
        while j < len(runs) and runs[j][0] < hi:
            a, b, i, at = runs[j]
            s, e = max(a, lo), min(b, hi)
            if s < e:
                buf = self._outs.get(i)
                if buf is None:
                    buf = self._outs[i] = self.out(i)
                buf[at + s - a:at + e - a] = data[s - lo:e - lo]
                self._left[i] -= e - s
                if self._left[i] == 0:
                    del self._outs[i]
                    self.done(i)
            j += 1
        while self._next < len(runs) and runs[self._next][1] <= hi:
            self._next += 1
        if self.check is not None:
            self._crc(data, lo, hi)
        self.pos = hi

    def _crc(self, data: np.ndarray, lo: int, hi: int) -> None:
        tensors = self._tensors
        while self._t < len(tensors) and tensors[self._t][1] + tensors[self._t][2] <= lo:
            self._t += 1  # ended before this chunk (skipped by a seek)
        k = self._t
        while k < len(tensors) and tensors[k][1] < hi:
            _, start, nbytes = tensors[k]
            s, e = max(start, lo), min(start + nbytes, hi)
            if s < e:
                seg = self._seg
                if seg is None or seg[0] != k or self._end != s:
                    self._flush()
                    seg = self._seg = [k, s, 0]
                seg[2] = crc32(data[s - lo:e - lo], seg[2])
                self._end = e
            if start + nbytes <= hi:
                self._flush()
                self._t = k + 1
            k += 1

    def _flush(self) -> None:
        """Report the bytes of the tensor passing now (a span ended, or the tensor did)."""
        seg, self._seg = self._seg, None
        if seg is None or self.check is None:
            return
        key, start, _ = self._tensors[seg[0]]
        if self._end > seg[1]:
            self.check.add(key, seg[1] - start, self._end - seg[1], seg[2])

    def finish(self) -> None:
        """The piece ended: every window must be complete."""
        self._flush()
        if any(self._left.values()):
            raise ValueError(f"{sum(self._left.values())} bytes of the piece's windows never came")
