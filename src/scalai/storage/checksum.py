"""CRC-32 checksums of large buffers, computed in parallel chunks.

The checksum of a stored tensor is zlib's CRC-32 (the one of ``zlib.crc32``, gzip and
PNG) of its raw little-endian bytes. :func:`crc32` computes it with zlib-ng's carry-less
multiplication kernels (about 25 GB/s on one x86 core) and falls back to the standard
library's ``zlib.crc32`` (about 4 GB/s) where the ``zlib-ng`` package is missing; both give
the same values and release the GIL. Long buffers are cut into chunks checksummed on a
thread pool and the chunk CRCs are joined with :func:`crc32_combine` (zlib's algorithm:
multiplication by ``x^(8 * len)`` modulo the CRC polynomial, O(log len)). The same algebra
runs backwards: :func:`crc32_of_range` finds the CRC-32 of a byte range of a buffer from
the buffer's CRC and those of the bytes around the range (``x`` has order ``2^32 - 1``
modulo the polynomial, so multiplying by ``x^(-k)`` is multiplying by ``x^(2^32 - 1 - k)``).

:class:`ChecksumLedger` is how writers of tensors learn a tensor's CRC-32 without reading
it back: from the CRCs of the pieces written, or from a CRC declared for the whole tensor.
"""

from __future__ import annotations

import threading
import zlib
from concurrent.futures import CancelledError, Executor
from typing import Hashable, Iterable

try:  # the same CRC-32, about 6x faster than zlib 1.2's
    from zlib_ng.zlib_ng import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; plain zlib is the fallback
    _fast_crc32 = zlib.crc32
try:  # zlib-ng's crc32_combine in C: under 1 us, where the algebra below takes 60 us in Python
    from zlib_ng.zlib_ng import crc32_combine as _fast_combine
except ImportError:  # pragma: no cover - zlib-ng is a dependency; the algebra is the fallback
    _fast_combine = None

__all__ = ["ALGORITHM", "crc32", "crc32_combine", "crc32_of_range", "crc32_zeros", "crc32_of_pieces",
           "checksums", "ChecksumLedger", "CHUNK_BYTES"]

#: Name recorded in manifests.
ALGORITHM = "crc32"
#: Bytes per checksum task (big enough to amortize task overhead, small to balance).
CHUNK_BYTES = 32 << 20

_POLY = 0xEDB88320  # reflected CRC-32 polynomial


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (bit-reflected representation)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # _X2N[k] = x^(2^k) mod p


def crc32(data, value: int = 0) -> int:
    """CRC-32 of the bytes of ``data`` (a contiguous buffer), continuing from ``value``."""
    return _fast_crc32(data, value)


def _x8n(n: int) -> int:
    """``x^(8 * n)`` modulo the CRC polynomial (``x^(2^32) = x``: ``x^(2^k)`` repeats every 32 ``k``)."""
    p, k = 1 << 31, 3  # 1; x^(8 * n): start at x^(2^3)
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


_ORDER = (1 << 32) - 1  # the multiplicative order of x modulo the CRC-32 polynomial (primitive)


def _combine_algebra(crc1: int, crc2: int, len2: int) -> int:
    """:func:`crc32_combine` by the algebra above (where zlib-ng is missing)."""
    return _multmodp(_x8n(len2), crc1) ^ crc2


_combine = _fast_combine if _fast_combine is not None else _combine_algebra


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)`` in bytes."""
    return _combine(crc1 & 0xFFFFFFFF, crc2 & 0xFFFFFFFF, len2)


def crc32_of_range(whole: int, head: int, length: int, tail: int, tail_len: int) -> int:
    """CRC-32 of the middle ``M`` of a buffer ``H + M + T`` without reading ``M``.

    Args:
        whole: ``crc32(H + M + T)``.
        head: ``crc32(H)`` (0 for no bytes).
        length: ``len(M)`` in bytes.
        tail: ``crc32(T)`` (0 for no bytes).
        tail_len: ``len(T)`` in bytes.

    ``whole = x^(8|T|) * crc(H + M) ^ tail`` and ``crc(H + M) = x^(8|M|) * head ^ crc(M)``,
    solved for ``crc(M)``: two polynomial products, whatever the lengths. The product by
    ``x^(8n)`` is :func:`crc32_combine` with an empty second part (``crc2 = 0``), and
    ``x^(-8|T|) = x^(8 (ORDER - |T| mod ORDER))`` (``x^ORDER = 1``).
    """
    head_and_middle = _combine((whole ^ tail) & 0xFFFFFFFF, 0, (_ORDER - tail_len % _ORDER) % _ORDER)
    return head_and_middle ^ _combine(head & 0xFFFFFFFF, 0, length)


def crc32_zeros(n: int) -> int:
    """CRC-32 of ``n`` zero bytes, in O(log n) without touching ``n`` bytes."""
    if n <= 1 << 16:
        return crc32(bytes(n))
    crc, power, length = 0, crc32(b"\0"), 1  # power = crc of 2^k zeros
    while n:
        if n & 1:
            crc = crc32_combine(crc, power, length)
        power = crc32_combine(power, power, length)
        n >>= 1
        length <<= 1
    return crc


def crc32_of_pieces(pieces: list[tuple[int, int, int]], total: int) -> int | None:
    """CRC-32 of a ``total``-byte buffer from the CRCs of pieces written into it.

    Args:
        pieces: ``(byte offset, length, crc)``; bytes that no piece covers are zeros.

    Returns:
        the CRC, or ``None`` when pieces overlap or fall outside (then read the bytes).
    """
    crc = pos = 0
    for offset, length, piece_crc in sorted(pieces):
        if offset < pos:
            return None
        if offset > pos:
            crc = crc32_combine(crc, crc32_zeros(offset - pos), offset - pos)
        crc = crc32_combine(crc, piece_crc, length) if pos or offset else piece_crc
        pos = offset + length
    if pos > total:
        return None
    if pos < total:
        crc = crc32_combine(crc, crc32_zeros(total - pos), total - pos)
    return crc


def checksums(buffers: Iterable[tuple[Hashable, object]], pool: Executor | None = None,
              chunk: int = CHUNK_BYTES, stop: threading.Event | None = None) -> dict[Hashable, int]:
    """CRC-32 of each ``(key, buffer)``; buffers are C-contiguous (numpy arrays, mmaps).

    With ``pool``, every ``chunk`` bytes of every buffer is a separate task. Reading a
    memory-mapped buffer here only touches its pages; no copy of the data is made.

    Raises:
        CancelledError: ``stop`` was set (checked before every chunk).
    """
    parts: list[tuple[Hashable, int, object]] = []
    for key, buf in buffers:
        mv = memoryview(buf)
        if mv.nbytes == 0:
            parts.append((key, 0, memoryview(b"")))
            continue
        mv = mv.cast("B")
        for lo in range(0, mv.nbytes, chunk):
            parts.append((key, min(chunk, mv.nbytes - lo), mv[lo:lo + chunk]))
    def one(data) -> int:
        if stop is not None and stop.is_set():
            raise CancelledError("checksums stopped")
        return crc32(data)

    if pool is None:
        crcs = [one(p) for _, _, p in parts]
    else:
        crcs = list(pool.map(one, [p for _, _, p in parts]))
    out: dict[Hashable, int] = {}
    for (key, length, _), crc in zip(parts, crcs):
        out[key] = crc if key not in out else crc32_combine(out[key], crc, length)
    return out


class ChecksumLedger:
    """What a writer knows of the CRC-32 of each tensor it is filling, keyed by any hashable.

    A tensor's CRC is known without reading it back when a whole-tensor CRC was declared
    (:meth:`declare`: it moves unchanged from a source that records it), or when every
    byte written came with the CRC of its piece (:meth:`piece`; bytes no piece covers are
    zeros). A piece written without a CRC, or a write through a mapping
    (:meth:`unknown`), means the tensor must be read back. Thread-safe.
    """

    def __init__(self):
        self._pieces: dict[Hashable, list[tuple[int, int, int]]] = {}
        self._unknown: set[Hashable] = set()
        self._declared: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def piece(self, key: Hashable, offset: int, nbytes: int, crc: int | None) -> None:
        """``nbytes`` bytes were written at byte ``offset``; ``crc``: theirs, if known."""
        with self._lock:
            if crc is None:
                self._unknown.add(key)
            else:
                self._pieces.setdefault(key, []).append((offset, nbytes, crc))

    def unknown(self, key: Hashable) -> None:
        """Bytes of ``key`` were (or may be) written without a CRC."""
        with self._lock:
            self._unknown.add(key)

    def declare(self, key: Hashable, crc: int) -> None:
        """The whole tensor will have CRC ``crc`` once written."""
        with self._lock:
            self._declared[key] = crc

    def known(self, key: Hashable, nbytes: int) -> int | None:
        """The CRC of the ``nbytes``-byte tensor ``key`` if known without reading it, else ``None``."""
        with self._lock:
            if key in self._declared:
                return self._declared[key]
            if key in self._unknown:
                return None
            return crc32_of_pieces(list(self._pieces.get(key, ())), nbytes)
