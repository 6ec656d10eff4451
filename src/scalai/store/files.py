"""One stored tensor = one file: a fixed 512-byte header, then the raw bytes (row-major).

Header: ``b"SCALAIT1"``, then a JSON object ``{"dtype", "shape", "crc32"}`` padded with
spaces to :data:`DATA_OFFSET` bytes. ``crc32`` is the CRC-32 of the data as 8 hex digits,
or ``null`` while unknown. A file is written under a temporary name and renamed into place
when complete (:class:`TensorUpload`), or, for the output of a transformation, allocated
at full size and filled with ``pwrite`` or through a mapping (:class:`NewTensor`); either
way, nothing reads a version before it is committed.
"""

from __future__ import annotations

import json
import mmap
import os
import secrets
import zlib
from dataclasses import dataclass
from math import prod

import numpy as np

from ..dtypes import itemsize, raw_numpy
from ..errors import ScalaiError
from .names import check_dtype

__all__ = ["TensorMeta", "DATA_OFFSET", "MAGIC", "read_meta", "map_tensor", "TensorUpload",
           "NewTensor", "StoreFileError"]

MAGIC = b"SCALAIT1"
DATA_OFFSET = 512


class StoreFileError(ScalaiError):
    """A stored tensor file is unreadable or damaged."""


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a stored tensor is: dtype name, local shape, CRC-32 of its bytes (or None)."""

    dtype: str
    shape: tuple[int, ...]
    crc32: int | None = None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "bytes": self.nbytes,
                "crc32": None if self.crc32 is None else f"{self.crc32:08x}"}


def _header(meta: TensorMeta) -> bytes:
    body = json.dumps({"dtype": meta.dtype, "shape": list(meta.shape),
                       "crc32": None if meta.crc32 is None else f"{meta.crc32:08x}"}).encode()
    if len(MAGIC) + len(body) > DATA_OFFSET:
        raise ValueError(f"shape {list(meta.shape)} is too long to store")
    return MAGIC + body.ljust(DATA_OFFSET - len(MAGIC))


def read_meta(path: str) -> TensorMeta:
    """Parse the header of ``path`` and check the file's size.

    Raises:
        StoreFileError: not a tensor file, a bad header, or the wrong size.
    """
    with open(path, "rb") as f:
        head = f.read(DATA_OFFSET)
        size = os.fstat(f.fileno()).st_size
    try:
        if head[:len(MAGIC)] != MAGIC:
            raise ValueError("bad magic")
        obj = json.loads(head[len(MAGIC):])
        meta = TensorMeta(check_dtype(obj["dtype"]), tuple(int(s) for s in obj["shape"]),
                          None if obj["crc32"] is None else int(obj["crc32"], 16))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreFileError(f"{path} is not a stored tensor ({exc})") from None
    if size != DATA_OFFSET + meta.nbytes:
        raise StoreFileError(f"{path} has {size} bytes, its header says {DATA_OFFSET + meta.nbytes}: "
                             f"truncated or damaged")
    return meta


def map_tensor(path: str, meta: TensorMeta, writable: bool = False) -> np.ndarray:
    """The tensor's raw array (its dtype's unsigned bits, local shape) over a file mapping.

    The mapping lives as long as the array; the file may be unlinked meanwhile.
    """
    dtype = raw_numpy(meta.dtype)
    if meta.nbytes == 0:
        return np.zeros(meta.shape, dtype)
    with open(path, "r+b" if writable else "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    array = np.frombuffer(mm, dtype=dtype, count=meta.numel, offset=DATA_OFFSET).reshape(meta.shape)
    return array


def _tmp_name(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{secrets.token_hex(4)}")


class TensorUpload:
    """Write a tensor file from a stream of chunks; :meth:`finish` renames it into place.

    The CRC-32 is computed while the bytes pass. Leaving without :meth:`finish` (or on
    :meth:`abort`) removes the temporary file; the previous file, if any, stays.
    """

    def __init__(self, path: str, dtype: str, shape: tuple[int, ...]):
        self.path, self.meta = path, TensorMeta(dtype, shape)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.tmp = _tmp_name(path)
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(self._fd, _header(self.meta))
        self.received = 0
        self._crc = 0

    def write(self, chunk) -> None:
        """Append ``chunk`` (bytes-like); raises ValueError past the declared size."""
        n = memoryview(chunk).nbytes
        if self.received + n > self.meta.nbytes:
            raise ValueError(f"body is longer than dtype {self.meta.dtype} x shape "
                             f"{list(self.meta.shape)} = {self.meta.nbytes} bytes")
        view = memoryview(chunk)
        while view.nbytes:
            written = os.write(self._fd, view)
            view = view[written:]
        self._crc = zlib.crc32(chunk, self._crc)
        self.received += n

    def finish(self, sync: bool = False) -> TensorMeta:
        """Check the length, record the CRC, rename into place; returns the meta."""
        if self.received != self.meta.nbytes:
            raise ValueError(f"body has {self.received} bytes but dtype {self.meta.dtype} x shape "
                             f"{list(self.meta.shape)} needs {self.meta.nbytes}")
        meta = TensorMeta(self.meta.dtype, self.meta.shape, self._crc)
        os.pwrite(self._fd, _header(meta), 0)
        if sync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.rename(self.tmp, self.path)
        return meta

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class NewTensor:
    """A tensor file being filled by a transformation: allocated at full size (zeros),
    written with ``pwrite`` (:meth:`write`, from any thread, disjoint ranges) or through a
    writable mapping (:meth:`mapping`, for strided windows).

    The CRC-32 comes from the pieces written with a CRC (combined, gaps are zeros), or
    from :meth:`declare` (a tensor copied unchanged), or else by reading the file back.
    """

    def __init__(self, path: str, meta: TensorMeta):
        self.path, self.meta = path, meta
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _header(meta))
            os.ftruncate(fd, DATA_OFFSET + meta.nbytes)
        finally:
            os.close(fd)
        self._pieces: list[tuple[int, int, int]] = []
        self._unknown = False
        self._declared: int | None = None
        self._map: np.ndarray | None = None

    def write(self, byte_offset: int, data, crc: int | None = None) -> None:
        """Write contiguous ``data`` at ``byte_offset`` of the tensor's bytes."""
        view = memoryview(data).cast("B")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            pos = 0
            while pos < view.nbytes:
                pos += os.pwrite(fd, view[pos:], DATA_OFFSET + byte_offset + pos)
        finally:
            os.close(fd)
        if crc is None:
            self._unknown = True
        else:
            self._pieces.append((byte_offset, view.nbytes, crc))

    def mapping(self) -> np.ndarray:
        """The writable raw array (elements written through it are checksummed at the end)."""
        self._unknown = True
        if self._map is None:
            self._map = map_tensor(self.path, self.meta, writable=True)
        return self._map

    def read(self) -> np.ndarray:
        """A read-only raw array of what was written so far."""
        return map_tensor(self.path, self.meta)

    def declare(self, crc: int) -> None:
        self._declared = crc

    def finish(self, checksum: bool = True) -> TensorMeta:
        """Record the CRC-32 in the header (when ``checksum``); returns the final meta."""
        self._map = None
        if not checksum:
            return self.meta
        crc = self._declared
        if crc is None and not self._unknown:
            from ..checkpoint.checksum import crc32_of_pieces

            crc = crc32_of_pieces(self._pieces, self.meta.nbytes)
        if crc is None:
            data = self.read()
            crc = zlib.crc32(data.reshape(-1).view(np.uint8)) if data.size else 0
        self.meta = TensorMeta(self.meta.dtype, self.meta.shape, crc)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, _header(self.meta), 0)
        finally:
            os.close(fd)
        return self.meta
