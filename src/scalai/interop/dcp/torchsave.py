"""``torch.save`` blobs: where a saved tensor's bytes are, and blobs written without torch.save.

DCP writes every chunk as one ``torch.save`` of the chunk tensor, back to back in a
``.distcp`` file. A ``torch.save`` blob is an uncompressed zip archive::

    archive/data.pkl        a pickle: _rebuild_tensor_v2(storage, offset, size, stride, ...)
    archive/byteorder       b"little"
    archive/data/0          the storage's raw bytes (aligned to 64 bytes in the archive)
    archive/version, ...    format bookkeeping

:func:`read_tensor_record` reads only the zip's central directory, the local header of the
data record and ``data.pkl`` (through the restricted unpickler: only torch's tensor
rebuild function, its storage types and ``OrderedDict``), and returns where the tensor's
elements start in the file and how they are strided, so that the data are read in place,
region by region, never through ``torch.load``. The zip's CRC-32 of the storage record is
the CRC-32 of the tensor's bytes when the tensor is its whole storage, row-major.

:class:`TensorBlob` lays out a blob for a tensor of a given dtype and shape before any of
its data exist (headers, then the data region at a known offset, then the central
directory), so that a sink can write the data region by region and fill the CRC-32 in at
the end. ``torch.load`` (and so ``dcp.load``) reads the result.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from math import prod
from typing import Any

from ...dtypes import itemsize
from ...errors import CheckpointError
from .pickles import restricted_loads
from .metadata import StoredBlob

__all__ = ["TensorRecord", "read_tensor_record", "read_object", "TensorBlob", "STORAGE_TYPES"]

#: torch's legacy storage class names (what ``data.pkl`` refers to) per dtype name.
STORAGE_TYPES = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
}
_PICKLE_MAX = 1 << 20
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # zip local file header
_ALIGN = 64


@dataclass(frozen=True)
class TensorRecord:
    """Where one saved tensor's elements are.

    Attributes:
        dtype: dtype name.
        shape: the tensor's shape.
        strides: element strides (row-major for DCP chunks).
        start: byte offset in the file of element ``(0, ..., 0)``.
        crc: CRC-32 of the tensor's bytes, when the archive records one and the tensor is
            its whole storage, row-major (``None`` otherwise).
    """

    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    start: int
    crc: int | None

    @property
    def contiguous(self) -> bool:
        return self.strides == _row_major(self.shape) or prod(self.shape) <= 1


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


class _Slice(io.RawIOBase):
    """The bytes ``[offset, offset + length)`` of an open file, as a seekable read-only stream."""

    def __init__(self, fd: int, offset: int, length: int):
        self._fd, self._base, self._len, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, {0: pos, 1: self._pos + pos, 2: self._len + pos}[whence])
        return self._pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self._len - self._pos))
        data = os.pread(self._fd, n, self._base + self._pos) if n else b""
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def pread(self, n: int, at: int) -> bytes:
        if at < 0 or at + n > self._len:
            raise CheckpointError("a record reaches past the end of its blob")
        data = os.pread(self._fd, n, self._base + at)
        if len(data) != n:
            raise CheckpointError("the file ends inside a record")
        return data


class _Archive:
    """The records of one ``torch.save`` zip blob (central directory only; no data read)."""

    def __init__(self, fd: int, blob: StoredBlob, what: str):
        self.what = what
        self.slice = _Slice(fd, blob.offset, blob.length)
        try:
            with zipfile.ZipFile(self.slice) as zf:
                self.infos = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise CheckpointError(f"{what} is not a torch.save archive ({exc}); the file is damaged or "
                                  f"was written in another format (DCP's safetensors format is not read)") from None
        pkl = [n for n in self.infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{what} is not a torch.save archive (no single data.pkl record)")
        self.prefix = pkl[0][:-len("data.pkl")]

    def data_span(self, name: str) -> tuple[int, int, int]:
        """``(start within the blob, size, CRC-32)`` of a stored record's data."""
        info = self.infos.get(self.prefix + name)
        if info is None:
            raise CheckpointError(f"{self.what} has no {name} record")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.what}: record {name} is compressed; torch.save never does that")
        header = self.slice.pread(_LOCAL.size, info.header_offset)
        fields = _LOCAL.unpack(header)
        if fields[0] != 0x04034B50:
            raise CheckpointError(f"{self.what}: record {name} has no zip local header")
        start = info.header_offset + _LOCAL.size + fields[9] + fields[10]
        if start + info.file_size > self.slice._len:
            raise CheckpointError(f"{self.what}: record {name} reaches past the end of its blob")
        return start, info.file_size, info.CRC

    def read(self, name: str, limit: int = _PICKLE_MAX) -> bytes:
        start, size, _ = self.data_span(name)
        if size > limit:
            raise CheckpointError(f"{self.what}: record {name} has {size} bytes, more than it ever needs")
        return self.slice.pread(size, start)


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise ValueError("the tensor's storage is not a saved storage")
    ints = (storage_offset, *size, *stride)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) \
            or len(size) != len(stride):
        raise ValueError(f"tensor geometry {storage_offset}, {size}, {stride} is invalid")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _tensor_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                                           ("collections", "OrderedDict"): OrderedDict}
    for dtype, cls in STORAGE_TYPES.items():
        allowed[("torch", cls)] = _StorageType(dtype)
    return allowed


def _persistent(pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
        raise ValueError(f"unexpected persistent id {pid!r}")
    return _Storage(pid[1].dtype, pid[2], pid[4])


def read_tensor_record(fd: int, blob: StoredBlob, what: str) -> TensorRecord:
    """Where the tensor saved in ``blob`` of the open file ``fd`` has its elements.

    Raises:
        CheckpointError: the blob is not a ``torch.save`` of one plain tensor (or refers to
            code: :class:`~scalai.interop.unpickle.UnsafePickleError`), or its storage
            record is too short for the tensor, or it is big-endian.
    """
    archive = _Archive(fd, blob, what)
    ref = restricted_loads(archive.read("data.pkl"), _tensor_globals(), what=f"{what} (data.pkl)",
                           persistent_load=_persistent)
    if not isinstance(ref, _TensorRef):
        raise CheckpointError(f"{what} holds a {type(ref).__name__}, not a tensor")
    if archive.prefix + "byteorder" in archive.infos and archive.read("byteorder") != b"little":
        raise CheckpointError(f"{what} was saved big-endian; scalai reads little-endian data only")
    start, size, crc = archive.data_span(f"data/{ref.storage.key}")
    width = itemsize(ref.storage.dtype)
    if size != ref.storage.numel * width:
        raise CheckpointError(f"{what}: the storage record has {size} bytes, not the {ref.storage.numel} "
                              f"elements of {width} bytes its pickle names")
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride)) + 1
    if prod(ref.size) and extent > ref.storage.numel:
        raise CheckpointError(f"{what}: the tensor reaches past its storage")
    whole = ref.offset == 0 and ref.stride == _row_major(ref.size) and prod(ref.size) == ref.storage.numel
    return TensorRecord(ref.storage.dtype, ref.size, ref.stride, blob.offset + start + ref.offset * width,
                        crc if whole and crc else None)


def read_object(fd: int, blob: StoredBlob, what: str) -> Any:
    """The plain Python value (numbers, strings, lists, tuples, dicts, ``None``) saved in ``blob``.

    Raises:
        UnsafePickleError: the value needs any class or function to be rebuilt.
        CheckpointError: the blob is damaged.
    """
    archive = _Archive(fd, blob, what)
    return restricted_loads(archive.read("data.pkl"), {("collections", "OrderedDict"): OrderedDict},
                            what=f"{what} (data.pkl)")


# -- writing --------------------------------------------------------------------------

def _pickle_int(n: int) -> bytes:
    if 0 <= n < 1 << 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _pickle_str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _pickle_ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"


def tensor_pickle(dtype: str, shape: tuple[int, ...]) -> bytes:
    """``data.pkl`` of a row-major tensor of ``dtype`` and ``shape`` in storage ``"0"``
    (protocol 2, the pickle ``torch.save`` writes)."""
    numel = prod(shape)
    return b"".join([
        b"\x80\x02", b"ctorch._utils\n_rebuild_tensor_v2\n",
        b"((", _pickle_str("storage"), b"ctorch\n" + STORAGE_TYPES[dtype].encode() + b"\n",
        _pickle_str("0"), _pickle_str("cpu"), _pickle_int(numel), b"tQ",
        _pickle_int(0), _pickle_ints(shape), _pickle_ints(_row_major(shape)),
        b"\x89", b"ccollections\nOrderedDict\n)R", b"tR.",
    ])


class TensorBlob:
    """The byte layout of a ``torch.save`` archive of one row-major tensor, data still to come.

    ``header`` goes at the blob's start, the tensor's ``nbytes`` bytes at ``data_offset``
    (relative to the blob's start), and :meth:`trailer` (given the data's CRC-32) at
    ``trailer_offset``; the blob has ``length`` bytes. The CRC is also stored in the data
    record's local header, at ``crc_offset``: :meth:`crc_patch` gives its bytes.
    """

    def __init__(self, dtype: str, shape: tuple[int, ...], name: str = "archive"):
        self.dtype, self.shape = dtype, tuple(shape)
        self.nbytes = prod(self.shape) * itemsize(dtype)
        self._name = name
        small = [("data.pkl", tensor_pickle(dtype, self.shape)), (".format_version", b"1"),
                 (".storage_alignment", b"64"), ("byteorder", b"little")]
        self._records: list[tuple[str, int, int, int, bool]] = []  # name, header offset, size, crc, zip64
        out = bytearray()
        for rec, data in small:
            out += self._local(rec, data, len(out))
        # The data record, its data aligned to 64 bytes within the archive (as torch does).
        data_name = f"{name}/data/0".encode()
        big = self.nbytes >= 0xFFFFFFFF
        start = len(out) + _LOCAL.size + len(data_name) + (20 if big else 0)
        pad = None if start % _ALIGN == 0 else (-(start + 4)) % _ALIGN
        self.crc_offset = len(out) + 14
        self._records.append(("data/0", len(out), self.nbytes, 0, big))
        out += self._header(data_name, 0, self.nbytes, big, pad)
        self.data_offset = len(out)
        self.header = bytes(out)
        self.trailer_offset = self.data_offset + self.nbytes
        version = b"3\n"
        self._tail_records = [("version", version)]
        self.length = self.trailer_offset + len(self.trailer(0))

    def _header(self, name: bytes, crc: int, size: int, zip64: bool, pad: int | None = None) -> bytes:
        extra = b""
        if zip64:
            extra += struct.pack("<HHQQ", 1, 16, size, size)
        if pad is not None:
            extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # torch's "FB" padding field
        s32 = 0xFFFFFFFF if zip64 else size
        return _LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0x21, crc, s32, s32, len(name),
                           len(extra)) + name + extra

    def _local(self, rec: str, data: bytes, at: int) -> bytes:
        import zlib

        crc = zlib.crc32(data)
        self._records.append((rec, at, len(data), crc, False))
        return self._header(f"{self._name}/{rec}".encode(), crc, len(data), False) + data

    def crc_patch(self, crc: int) -> bytes:
        """The 4 bytes to write at ``crc_offset`` once the data's CRC-32 is known."""
        return struct.pack("<I", crc)

    def trailer(self, crc: int) -> bytes:
        """The bytes after the data: the last small records, the central directory and its end."""
        import zlib

        out = bytearray()
        records = list(self._records)
        records[-1] = records[-1][:3] + (crc,) + records[-1][4:]
        base = self.trailer_offset
        for rec, data in self._tail_records:
            c = zlib.crc32(data)
            records.append((rec, base + len(out), len(data), c, False))
            out += self._header(f"{self._name}/{rec}".encode(), c, len(data), False) + data
        cd_start = base + len(out)
        for rec, at, size, c, big in records:
            name = f"{self._name}/{rec}".encode()
            far = at >= 0xFFFFFFFF
            extra = b""
            if big or far:
                values = ([size, size] if big else []) + ([at] if far else [])
                extra = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values)
            s32 = 0xFFFFFFFF if big else size
            out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if extra else 20, 0, 0, 0, 0x21, c, s32,
                               s32, len(name), len(extra), 0, 0, 0, 0, 0xFFFFFFFF if far else at) + name + extra
        cd_size = base + len(out) - cd_start
        n = len(records)
        if cd_start >= 0xFFFFFFFF:
            end64 = base + len(out)
            out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start)
            out += struct.pack("<IIQI", 0x07064B50, 0, end64, 1)
            out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, 0xFFFFFFFF, 0xFFFFFFFF, 0)
        else:
            out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_start, 0)
        return bytes(out)
