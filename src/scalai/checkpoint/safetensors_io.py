"""Our own reader and writer of the safetensors format, built for in-place, partial I/O.

A safetensors file is ``u64 little-endian header length N`` + ``N`` bytes of JSON header
``{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}`` + the data section; offsets are relative to the data section, tensors are
row-major and little-endian and tile the data section without gaps.

Why our own: the official library reads whole tensors; we need (1) a writer that
preallocates the file and lets several threads fill regions of it in place, and (2) a
reader that returns views of any region while touching only the bytes of that region.
Both use the raw unsigned-integer numpy dtype of the element width
(:func:`scalai.dtypes.raw_numpy`), so copies move bits and bfloat16 needs no conversion.
Files written here load with the official ``safetensors`` library.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from math import prod
from typing import Sequence

import numpy as np

from ..bounded import loads, open_regular
from ..dtypes import from_safetensors_code, itemsize, raw_numpy, safetensors_code
from ..errors import CheckpointError
from ..regions import Region
from ..storage.kernel import kernel_copy

__all__ = ["TensorEntry", "SafetensorsWriter", "SafetensorsReader", "MAX_HEADER_BYTES", "file_layout",
           "header_length", "parse_header"]

#: Largest header accepted by the reader (the official library's limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: The data section starts at a multiple of this many bytes (the header is padded with
#: spaces, as the format allows): a tensor's offset in a page is then the same in every
#: file scalai writes, whatever the header's length. Kernel copies between files run at
#: the speed their relative page offset allows: one 8 bytes ahead of its source modulo a
#: page ran at less than half the speed on an AMD EPYC, 16 ahead at 4/5 (4 KiB aliasing).
_ALIGN = 4096


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lies in a file: ``start`` is an absolute byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def file_layout(entries: Sequence[tuple[str, str, Sequence[int]]],
            metadata: dict[str, str] | None) -> tuple[bytes, dict[str, TensorEntry], int]:
    """Header bytes (length prefix included), entries with absolute offsets, file size."""
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    spans: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for name, dtype, shape in entries:
        if name == "__metadata__" or name in header:
            raise ValueError(f"tensor name {name!r} is reserved or repeated; give each tensor once")
        shape = tuple(int(s) for s in shape)
        nbytes = prod(shape) * itemsize(dtype)
        header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        spans.append((name, dtype, shape, offset, nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    base = 8 + len(text)
    table = {n: TensorEntry(n, d, s, base + o, b) for n, d, s, o, b in spans}
    return struct.pack("<Q", len(text)) + text, table, base + offset


def _array(buf: mmap.mmap, entry: TensorEntry) -> np.ndarray:
    dtype = raw_numpy(entry.dtype)
    if entry.nbytes == 0:
        return np.zeros(entry.shape, dtype)
    flat = np.frombuffer(buf, dtype, count=entry.nbytes // dtype.itemsize, offset=entry.start)
    return flat.reshape(entry.shape)


def _load_sync_file_range():
    """libc's ``sync_file_range`` (Linux) through ctypes, or ``None`` where it is missing."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        return fn
    except (OSError, AttributeError):
        return None


_SYNC_FILE_RANGE = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range(fd: int, offset: int, nbytes: int) -> None:
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


def _close_map(buf: mmap.mmap | None) -> None:
    if buf is None:
        return
    try:
        buf.close()
    except BufferError:
        pass  # views still exist: the mapping stays alive until they are gone


class SafetensorsWriter:
    """Write one safetensors file in place: header first, data filled by the caller.

    The file is created under a temporary name next to ``path`` at its final size, sparse:
    unwritten blocks read as zeros, so regions nobody writes stay zero, and blocks are
    allocated as they are written (on tmpfs, reserving all of them first was a serial pass
    over every page before any copy could start). :meth:`write` is ``pwrite`` at a byte
    offset of a tensor and :meth:`copy_from` a kernel copy (a full disk is an ``OSError``
    there); :meth:`view` hands out writable memory-mapped arrays, and reserves the tensor's
    blocks first (``posix_fallocate``: a full disk is an error now, not a ``SIGBUS`` on a
    store through the mapping). All may be used from several threads on disjoint regions.
    :meth:`finalize` flushes, fsyncs and renames the file into place.

    Args:
        path: final file name.
        entries: ``(name, dtype name, shape)`` of each tensor, in file order.
        metadata: the header's ``__metadata__`` (str -> str).
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = os.fspath(path)
        header, self.entries, self.size = file_layout(entries, metadata)
        folder, base = os.path.split(self.path)
        self.tmp_path = os.path.join(folder, f".{base}.tmp-{os.getpid()}")
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()
        self.finalized = False
        self._reserved: set[str] = set()
        try:
            os.ftruncate(self._fd, self.size)
            os.pwrite(self._fd, header, 0)
        except OSError as exc:  # name the file: a full disk says where it was full
            self.abort()
            raise OSError(exc.errno, f"{exc.strerror} while creating a file of {self.size} bytes",
                          self.path) from None
        except BaseException:
            self.abort()
            raise

    def fileno(self) -> int:
        return self._fd

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def view(self, name: str) -> np.ndarray:
        """Writable raw array of tensor ``name`` (local shape), backed by the file; its
        blocks are reserved first.

        Raises:
            OSError: no space left for the tensor.
        """
        entry = self.entry(name)
        if name not in self._reserved:
            try:
                os.posix_fallocate(self._fd, entry.start, max(entry.nbytes, 1))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate here: faults allocate
                    raise OSError(exc.errno, f"{exc.strerror} while reserving {entry.nbytes} bytes for {name}",
                                  self.path) from None
            self._reserved.add(name)
        if self._map is None:
            with self._lock:
                if self._map is None:
                    self._map = mmap.mmap(self._fd, self.size)
        return _array(self._map, entry)

    def write(self, name: str, byte_offset: int, data) -> None:
        """Write the bytes of ``data`` (a contiguous buffer) at ``byte_offset`` of tensor ``name``.

        No lock here: the kernel serializes writes into one file (its inode lock), and a
        waiter spins there only while the writer runs. A lock of this process's in front
        of it cost each hand-off a futex wake-up and the GIL: two threads writing one
        file took 15 % longer behind it (TP 2->1 of gpt2-small without the check)."""
        entry = self.entry(name)
        mv = memoryview(data)
        if byte_offset < 0 or byte_offset + mv.nbytes > entry.nbytes:
            raise ValueError(f"write of {mv.nbytes} bytes at {byte_offset} falls outside "
                             f"{name} ({entry.nbytes} bytes)")
        if mv.nbytes == 0:
            return
        mv = mv.cast("B")
        pos = entry.start + byte_offset
        try:
            while mv.nbytes:
                done = os.pwrite(self._fd, mv, pos)
                mv, pos = mv[done:], pos + done
        except OSError as exc:  # name the file: a full disk says where it was full
            raise OSError(exc.errno, f"{exc.strerror} while writing {name}", self.path) from None

    def copy_from(self, name: str, byte_offset: int, fd: int, offset: int, nbytes: int) -> bool:
        """Copy ``nbytes`` bytes of file ``fd`` at ``offset`` to ``byte_offset`` of tensor
        ``name`` inside the kernel (``copy_file_range``). ``False``, with nothing written,
        where the kernel cannot (another filesystem, an old kernel, no such call)."""
        entry = self.entry(name)
        if byte_offset < 0 or byte_offset + nbytes > entry.nbytes:
            raise ValueError(f"copy of {nbytes} bytes at {byte_offset} falls outside "
                             f"{name} ({entry.nbytes} bytes)")
        return self._kernel_copy(fd, offset, entry.start + byte_offset, nbytes, name)

    def copy_tensors(self, names: Sequence[str], fd: int, offset: int) -> bool:
        """Copy whole tensors ``names``, consecutive in this file (in that order), from file
        ``fd`` at ``offset`` (their bytes one after the other there too) in one kernel copy;
        ``False``, nothing written, where the kernel cannot.

        Raises:
            ValueError: the tensors are not consecutive here.
        """
        entries = [self.entry(n) for n in names]
        for a, b in zip(entries, entries[1:]):
            if b.start != a.start + a.nbytes:
                raise ValueError(f"tensors {a.name} and {b.name} are not consecutive in {self.path}")
        if not entries:
            return True
        nbytes = entries[-1].start + entries[-1].nbytes - entries[0].start
        return self._kernel_copy(fd, offset, entries[0].start, nbytes, f"{entries[0].name}..{entries[-1].name}")

    def _kernel_copy(self, fd: int, offset: int, at: int, nbytes: int, what: str) -> bool:
        """``copy_file_range`` of ``nbytes`` bytes of ``fd`` at ``offset`` to byte ``at`` of
        this file; an error names this file and ``what`` was being written."""
        try:
            return kernel_copy(fd, offset, self._fd, at, nbytes)
        except OSError as exc:  # name the file: a full disk says where it was full
            raise OSError(exc.errno, f"{exc.strerror} while writing {what}", self.path) from None

    def start_writeback(self, name: str) -> None:
        """Ask the kernel to start writing tensor ``name``'s bytes to disk, without waiting,
        so that the fsync of :meth:`finalize` overlaps with the rest of the work."""
        entry = self.entries[name]
        _sync_file_range(self._fd, entry.start, entry.nbytes)

    def finalize(self, sync: bool = True) -> None:
        """Make the file durable (``sync``: msync + fsync) and atomically rename it to
        :attr:`path`. Without ``sync`` the data reaches the disk whenever the kernel writes
        it back (mapped and written pages share the page cache, so readers see it now)."""
        if sync:
            if self._map is not None:
                self._map.flush()
            os.fsync(self._fd)
        os.rename(self.tmp_path, self.path)
        self.finalized = True
        self.close()

    def close(self) -> None:
        _close_map(self._map)
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close and delete the temporary file (nothing happens after :meth:`finalize`)."""
        self.close()
        if not self.finalized:
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.finalized:
            self.finalize()
        else:
            self.abort()


def header_length(prefix: bytes, size: int, bad) -> int:
    """The header length ``N`` from a file's first 8 bytes, checked against the file's
    ``size`` in bytes (``bad(why)`` makes the error to raise)."""
    if size < 8 or len(prefix) < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise bad(f"header length {n} does not fit in {size} bytes")
    return n


def parse_header(raw: bytes, n: int, size: int, bad) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Parse the ``n`` header bytes ``raw`` of a safetensors file of ``size`` bytes strictly
    (dtypes, shapes, offsets that tile the data section, the file's length); ``bad(why)``
    makes the error to raise. Returns ``(metadata, entries)``, offsets absolute."""
    if len(raw) != n:
        raise bad(f"the header ends after {len(raw)} of its {n} bytes")
    try:
        header = loads(raw, "header")
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a str -> str object")
    base, entries, spans = 8 + n, {}, []
    for name, info in header.items():
        try:
            dtype = from_safetensors_code(info["dtype"])
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"bad header entry for {name!r}: {info!r}")
        if end - begin != prod(shape) * itemsize(dtype):
            raise bad(f"{name!r} spans {end - begin} bytes, its shape needs "
                  f"{prod(shape) * itemsize(dtype)}")
        entries[name] = TensorEntry(name, dtype, shape, base + begin, end - begin)
        spans.append((begin, end, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            kind = "overlaps the previous tensor" if begin < expected else "leaves a gap"
            raise bad(f"{name!r} at byte {begin} {kind}")
        expected = end
    if base + expected != size:
        raise bad(f"the header describes {base + expected} bytes, the file has {size}")
    return metadata, entries


class SafetensorsReader:
    """Read-only, memory-mapped access to one safetensors file.

    The header is parsed strictly (sizes, bounds, gaps, overlaps, file length); any problem
    is a :class:`~scalai.errors.CheckpointError` naming the file. Views are read-only and
    lazy: only the pages of the elements actually read are loaded.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fd = open_regular(self.path, "safetensors file", CheckpointError)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing") from None
        self._map: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._fd).st_size
            self.metadata, self.entries = self._parse()
            if self.size:
                self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is truncated or corrupt: {why}")

    def _parse(self) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        n = header_length(os.pread(self._fd, 8, 0) if self.size >= 8 else b"", self.size, self._bad)
        return parse_header(os.pread(self._fd, n, 8), n, self.size, self._bad)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path}") from None

    def view(self, name: str, region: Region | None = None) -> np.ndarray:
        """Read-only raw array of tensor ``name`` or of ``region`` of it (no bytes read yet)."""
        entry = self.entry(name)
        if self._map is None:
            raise CheckpointError(f"{self.path} is closed")
        array = _array(self._map, entry)
        if region is None:
            return array
        if region.ndim != len(entry.shape) or not Region.full(entry.shape).contains(region):
            raise ValueError(f"region {region} lies outside {name} of shape {list(entry.shape)}")
        return array[region.to_slices()]

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        _close_map(self._map)
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
