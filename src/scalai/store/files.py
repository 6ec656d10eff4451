"""One stored tensor = one file: a fixed 512-byte header, then the raw bytes (row-major).

Header: ``b"SCALAIT1"``, then a JSON object ``{"dtype", "shape", "crc32"}`` padded with
spaces to :data:`DATA_OFFSET` bytes. ``crc32`` is the CRC-32 of the data as 8 hex digits,
or ``null`` while unknown. An upload is written to a private file outside every version
(:class:`TensorUpload`), which the catalog renames into place only after checking, under
its lock, that the version still exists and is not committed; the output of a
transformation is allocated at full size and filled with ``pwrite`` or through a mapping
(:class:`NewTensor`), always through the file it created (never another file that later
takes its name). Either way, nothing reads a version before it is committed, and nothing
writes one after.

A client on the store's own machine may write the private file itself (the same format,
:func:`write_tensor_file`, named :func:`local_name` in the store's upload directory) and
ask the store to adopt it (:func:`check_adoptable`, then the same rename under the lock):
no byte crosses a socket (see :mod:`scalai.store.local`).

A tensor that a transformation moves unchanged within a store (the same dtype, shape and
bytes as a committed tensor file of this store) is not copied: :meth:`NewTensor.link`
makes its name a hard link to that file. Versions may share an inode because nothing ever
writes a committed file (a linked tensor refuses every write; an upload replaces a name,
never a file's bytes) and deleting a version removes only its own names: the bytes live
as long as one version names them.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from math import prod

import numpy as np

from ..dtypes import itemsize, raw_numpy
from ..errors import ScalaiError
from ..storage.checksum import ChecksumLedger, crc32
from ..storage.kernel import kernel_copy
from .names import check_dtype

__all__ = ["TensorMeta", "DATA_OFFSET", "MAGIC", "read_meta", "map_tensor", "TensorUpload",
           "NewTensor", "StoreFileError", "private_name", "local_name", "is_local_name", "LOCAL_PREFIX", "write_tensor_file",
           "seal_tensor_file", "check_adoptable"]

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


def _parse_header(head: bytes) -> TensorMeta:
    """The meta in a file's first :data:`DATA_OFFSET` bytes; ValueError if it is not one."""
    try:
        if head[:len(MAGIC)] != MAGIC:
            raise ValueError("bad magic")
        obj = json.loads(head[len(MAGIC):])
        return TensorMeta(check_dtype(obj["dtype"]), tuple(int(s) for s in obj["shape"]),
                          None if obj["crc32"] is None else int(obj["crc32"], 16))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def read_meta(path: str) -> TensorMeta:
    """Parse the header of ``path`` and check the file's size.

    Raises:
        StoreFileError: not a tensor file, a bad header, or the wrong size.
    """
    with open(path, "rb") as f:
        head = f.read(DATA_OFFSET)
        size = os.fstat(f.fileno()).st_size
    try:
        meta = _parse_header(head)
    except ValueError as exc:
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


def private_name(directory: str) -> str:
    """A new, unused file name in ``directory`` (for a file that is renamed into place)."""
    return os.path.join(directory, f"upload-{secrets.token_hex(8)}")


#: What the names of files written by clients on the store's machine start with.
LOCAL_PREFIX = "local-"
_LOCAL_NAME = re.compile(r"local-[0-9a-f]{32}")
CHUNK = 1 << 20  # bytes per write (and CRC) of a tensor file written whole


def is_local_name(name) -> bool:
    """Whether ``name`` is a client's private upload name (``local-`` + 32 hex digits)."""
    return isinstance(name, str) and _LOCAL_NAME.fullmatch(name) is not None


def local_name(directory: str) -> str:
    """A new private file name in a store's upload directory, for a client that writes the
    file itself (``local-`` and 32 hex digits: the only names a store adopts)."""
    return os.path.join(directory, f"{LOCAL_PREFIX}{secrets.token_hex(16)}")


def write_tensor_file(path: str, raw: np.ndarray, dtype: str, checksum: bool = True) -> TensorMeta:
    """Write the tensor file ``path`` (new, 0600) from the raw array ``raw`` (C-contiguous
    or not; its local shape), CRC-32 computed block by block while each block is in cache.
    ``checksum=False`` leaves the header's CRC ``null`` (see :func:`seal_tensor_file`).
    A failure removes the file."""
    upload = TensorUpload(path, dtype, tuple(raw.shape), checksum=checksum)
    try:
        flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8) if raw.size else np.zeros(0, np.uint8)
        view = memoryview(flat)
        for lo in range(0, view.nbytes, CHUNK):
            upload.write(view[lo:lo + CHUNK])
        return upload.finish()
    except BaseException:
        upload.abort()
        raise


def seal_tensor_file(path: str) -> TensorMeta:
    """Record the CRC-32 of a tensor file written without one (read back through a mapping:
    the bytes are in memory); returns the final meta."""
    meta = read_meta(path)
    if meta.crc32 is not None:
        return meta
    data = map_tensor(path, meta)
    crc = crc32(data.reshape(-1).view(np.uint8)) if data.size else 0
    del data
    meta = TensorMeta(meta.dtype, meta.shape, crc)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, _header(meta), 0)
    finally:
        os.close(fd)
    return meta


def check_adoptable(directory: str, name: str, dtype: str, shape: tuple[int, ...]) -> tuple[TensorMeta, tuple]:
    """Check that ``name`` is a client's private tensor file in the upload ``directory``
    that a store may adopt as a tensor of ``dtype`` x ``shape``: a ``local-`` name (no path
    separator), a regular file (a symlink is refused: ``O_NOFOLLOW``) with one link, the
    size and header of that dtype and shape, and a recorded CRC-32.

    Returns:
        ``(meta, (st_dev, st_ino))``: the meta (with its CRC) and the file's identity.

    Raises:
        ValueError: it is not (the message says why).
    """
    if not is_local_name(name):
        raise ValueError(f"file {name!r} is not a private upload name (local- and 32 hex digits, no "
                         f"directory); write the file with scalai.store.files.local_name")
    want = TensorMeta(dtype, tuple(shape))
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ValueError(f"upload file {name} is not in the store's upload directory {directory}; write it "
                         f"there first (a client on another machine must upload over HTTP)") from None
    except OSError as exc:  # ELOOP: a symbolic link
        raise ValueError(f"upload file {name} in {directory} cannot be adopted: "
                         f"{'it is a symbolic link' if exc.errno == 40 else exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ValueError(f"upload file {name} in {directory} is not a private regular file "
                             f"({'a hard link' if stat.S_ISREG(st.st_mode) else 'not a file'}); write a new one")
        if st.st_size != DATA_OFFSET + want.nbytes:
            raise ValueError(f"upload file {name} has {st.st_size} bytes, but dtype {dtype} x shape "
                             f"{list(want.shape)} needs {DATA_OFFSET + want.nbytes}")
        head = os.pread(fd, DATA_OFFSET, 0)
    finally:
        os.close(fd)
    try:
        got = _parse_header(head)
    except ValueError as exc:
        raise ValueError(f"upload file {name} is not a stored tensor ({exc})") from None
    if (got.dtype, got.shape) != (want.dtype, want.shape):
        raise ValueError(f"upload file {name} holds dtype {got.dtype} x shape {list(got.shape)}, not the "
                         f"declared {dtype} x {list(want.shape)}")
    if got.crc32 is None:
        raise ValueError(f"upload file {name} records no CRC-32; seal it first (scalai.store.files."
                         f"seal_tensor_file)")
    return got, (st.st_dev, st.st_ino)


class TensorUpload:
    """Write a tensor file at the private path ``tmp`` from a stream of chunks.

    The CRC-32 is computed while the bytes pass. :meth:`finish` completes the file (the
    caller then renames it into place, see :meth:`Catalog.finish_upload`); :meth:`abort`
    removes it.
    """

    def __init__(self, tmp: str, dtype: str, shape: tuple[int, ...], checksum: bool = True):
        self.tmp, self.meta, self.checksum = tmp, TensorMeta(dtype, shape), checksum
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
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
        if self.checksum:
            self._crc = crc32(chunk, self._crc)
        self.received += n

    def finish(self, sync: bool = False) -> TensorMeta:
        """Check the length, record the CRC in the header, close; returns the meta."""
        if self.received != self.meta.nbytes:
            raise ValueError(f"body has {self.received} bytes but dtype {self.meta.dtype} x shape "
                             f"{list(self.meta.shape)} needs {self.meta.nbytes}")
        meta = TensorMeta(self.meta.dtype, self.meta.shape, self._crc if self.checksum else None)
        if self.checksum:
            os.pwrite(self._fd, _header(meta), 0)
        if sync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
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
    A tensor that moves unchanged may instead become a link to its committed file
    (:meth:`link`); it is then never written.
    """

    def __init__(self, path: str, meta: TensorMeta):
        self.path, self.meta = path, meta
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, _header(meta))
            os.ftruncate(fd, DATA_OFFSET + meta.nbytes)
            st = os.fstat(fd)
            self._ident = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)
        self._ledger = ChecksumLedger()
        self._map: np.ndarray | None = None
        self._lock = threading.Lock()
        self._touched = False  # something was written (a link then has to be refused)
        self.linked = False    # this name is a link to a committed tensor file (see link)

    @property
    def ident(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of this tensor's file (after :meth:`link`: the linked file)."""
        return self._ident

    def _open(self, flags: int) -> int:
        """Open this tensor's own file: the one it created, not a file that took its name
        after its version was deleted (then StoreFileError: the writer stops)."""
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise StoreFileError(f"{self.path} was deleted while being written") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._ident:
            os.close(fd)
            raise StoreFileError(f"{self.path} was deleted while being written")
        return fd

    def _writing(self) -> None:
        if self.linked:  # the file is a committed version's: it never changes
            raise StoreFileError(f"{self.path} is linked to a committed tensor file and cannot be written")
        self._touched = True

    def write(self, byte_offset: int, data, crc: int | None = None) -> None:
        """Write contiguous ``data`` at ``byte_offset`` of the tensor's bytes."""
        self._writing()
        view = memoryview(data).cast("B")
        fd = self._open(os.O_WRONLY)
        try:
            pos = 0
            while pos < view.nbytes:
                pos += os.pwrite(fd, view[pos:], DATA_OFFSET + byte_offset + pos)
        finally:
            os.close(fd)
        self._ledger.piece(None, byte_offset, view.nbytes, crc)

    def copy_from(self, byte_offset: int, src_fd: int, offset: int, nbytes: int, crc: int | None) -> bool:
        """Copy ``nbytes`` of file ``src_fd`` at ``offset`` to ``byte_offset`` of the tensor
        inside the kernel (``copy_file_range``); ``False``, nothing written, where it cannot."""
        self._writing()
        fd = self._open(os.O_WRONLY)
        try:
            if not kernel_copy(src_fd, offset, fd, DATA_OFFSET + byte_offset, nbytes):
                return False
        finally:
            os.close(fd)
        self._ledger.piece(None, byte_offset, nbytes, crc)
        return True

    def mapping(self) -> np.ndarray:
        """The writable raw array (elements written through it are checksummed at the end)."""
        self._writing()
        self._ledger.unknown(None)
        with self._lock:
            if self._map is None:
                self._map = self._mapped(writable=True)
        return self._map

    def read(self) -> np.ndarray:
        """A read-only raw array of what was written so far."""
        return self._mapped(writable=False)

    def _mapped(self, writable: bool) -> np.ndarray:
        if self.meta.nbytes == 0:
            return np.zeros(self.meta.shape, raw_numpy(self.meta.dtype))
        fd = self._open(os.O_RDWR if writable else os.O_RDONLY)
        try:
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        return np.frombuffer(mm, dtype=raw_numpy(self.meta.dtype), count=self.meta.numel,
                             offset=DATA_OFFSET).reshape(self.meta.shape)

    def link(self, src_path: str, src_fd: int, crc: int) -> bool:
        """Make this tensor the very file ``src_fd`` (a committed tensor file of the same
        store, named ``src_path``): a hard link replaces the file allocated for it, no byte
        is copied.

        Only where nothing was written here yet and ``src_fd`` is exactly what this tensor
        would be once filled: a regular file whose header says this dtype, this shape and
        CRC-32 ``crc`` (the CRC its version recorded), and whose size fits them. The link
        made to ``src_path`` must land on the inode ``src_fd`` has open (the file checked,
        not one that took its name since). From then on every write refuses, and
        :meth:`finish` records ``crc`` without touching the file.

        Returns ``False``, nothing changed, where the file differs or the filesystem refuses
        (another filesystem, one without hard links, a source deleted meanwhile): the
        caller copies the bytes instead.

        Raises:
            StoreFileError: this tensor's version was deleted meanwhile.
        """
        meta = TensorMeta(self.meta.dtype, self.meta.shape, crc)
        st = os.fstat(src_fd)
        if (self._touched or self.linked or not stat.S_ISREG(st.st_mode)
                or st.st_size != DATA_OFFSET + meta.nbytes or os.pread(src_fd, DATA_OFFSET, 0) != _header(meta)):
            return False
        # a hidden name beside the tensor (a store that dies here drops it at its next start)
        tmp = os.path.join(os.path.dirname(self.path), f".link-{secrets.token_hex(8)}")
        try:
            os.link(src_path, tmp, follow_symlinks=False)
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(self.path)):  # the version went away
                raise StoreFileError(f"{self.path} was deleted while being written") from None
            return False  # the source was deleted meanwhile
        except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP...: copy instead
            return False
        try:
            linked = os.stat(tmp)
            if (linked.st_dev, linked.st_ino) != (st.st_dev, st.st_ino):
                return False  # another file took the source's name: not the one checked
            os.close(self._open(os.O_RDONLY))  # the name is still this tensor's own (not deleted)
            with self._lock:
                if self._touched:
                    return False
                os.rename(tmp, self.path)
                self._ident, self.meta, self.linked = (st.st_dev, st.st_ino), meta, True
            return True
        finally:
            if not self.linked:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def declare(self, crc: int) -> None:
        """The whole tensor will have CRC-32 ``crc`` (it moves unchanged)."""
        self._ledger.declare(None, crc)

    def finish(self, checksum: bool = True) -> TensorMeta:
        """Record the CRC-32 in the header (when ``checksum``); returns the final meta.
        The CRC comes from what the writes said (pieces, a declaration), else from reading
        the tensor back."""
        self._map = None
        if not checksum or self.linked:  # a linked file's header already says its CRC
            return self.meta
        crc = self._ledger.known(None, self.meta.nbytes)
        if crc is None:
            data = self.read()
            crc = crc32(data.reshape(-1).view(np.uint8)) if data.size else 0
        self.meta = TensorMeta(self.meta.dtype, self.meta.shape, crc)
        fd = self._open(os.O_WRONLY)
        try:
            os.pwrite(fd, _header(self.meta), 0)
        finally:
            os.close(fd)
        return self.meta
